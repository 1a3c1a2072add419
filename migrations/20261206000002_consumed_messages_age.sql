-- Recovery deletes consumed-message records past
-- payment.message_retention_secs, oldest first.
CREATE INDEX idx_consumed_messages_at ON consumed_messages (consumed_at);
