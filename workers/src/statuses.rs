//! The stored vocabularies of orders and admissions, each owned here once:
//! the Rust value, the text MySQL stores (and the api shows), and the
//! parse back, which refuses a text this build does not know.
//!
//! | enum | column | values |
//! |---|---|---|
//! | [`OrderStatus`] | `orders.status` | `unpaid`, `paying`, `paid`, `closed` |
//! | [`CloseReason`] | `orders.close_reason` | `cancelled`, `timeout` |
//! | [`FailReason`] | `failed_admissions.reason` | `sold_out`, `unknown_sale`, `duplicate`, `released` |
//! | [`ResultStatus`] | the buyer's result key (Redis), the poll answer | `success`, `queued`, `failed`, `none` |
//! | [`TxState`] | `pay_transactions.state` | `started`, `committing`, `aborting`, `committed`, `aborted` |
//! | [`AbortReason`] | `pay_transactions.reason` | `insufficient_funds`, `order_not_payable`, `wallet_unavailable`, `wallet_refused`, `timeout` |
//! | [`FencePhase`] | `tcc_fences.phase` (both databases) | `try`, `confirm`, `cancel` |
//! | [`LedgerKind`] | `wallet_ledger.kind` (the wallet's database) | `credit`, `freeze`, `unfreeze`, `debit`, `refund` |
//!
//! SQL in Rust never spells these out: the values are bound as parameters
//! (`.bind(OrderStatus::Unpaid)`), so a renamed value cannot leave a stale
//! literal behind in some query. The stored procedures of the payment
//! steps (`migrations/*_procedures.sql`, `*_steps.sql`) must, as the
//! columns' `ENUM`s do; a test checks every word they quote against these
//! enums and the procedures' own outcomes. An unknown stored value (a
//! newer build's, or a hand-edited row) is an [`UnknownValue`] error,
//! never read as something else.

use std::fmt;
use std::str::FromStr;

/// A stored text that is none of its enum's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} {value:?}")]
pub struct UnknownValue {
    /// Which vocabulary, e.g. `order status`.
    pub kind: &'static str,
    pub value: String,
}

/// Defines an enum of stored values with `as_str`, `Display`, `FromStr`
/// (refusing unknown text with [`UnknownValue`]), serde as the text, and
/// binding as a MySQL string parameter.
macro_rules! stored_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $kind:literal {
            $( $(#[$vmeta:meta])* $variant:ident => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored (and shown) text.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownValue;

            fn from_str(s: &str) -> Result<$name, UnknownValue> {
                match s {
                    $( $text => Ok($name::$variant), )+
                    _ => Err(UnknownValue {
                        kind: $kind,
                        value: s.to_string(),
                    }),
                }
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        /// In the OpenAPI document: a string of exactly these values.
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .enum_values(Some([$($text),+]))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {}

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<$name, D::Error> {
                let text = String::deserialize(d)?;
                text.parse().map_err(serde::de::Error::custom)
            }
        }

        impl sqlx::Type<sqlx::MySql> for $name {
            fn type_info() -> sqlx::mysql::MySqlTypeInfo {
                <str as sqlx::Type<sqlx::MySql>>::type_info()
            }
        }

        impl<'q> sqlx::Encode<'q, sqlx::MySql> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut Vec<u8>,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<'q, sqlx::MySql>>::encode(self.as_str(), buf)
            }
        }
    };
}

stored_enum! {
    /// Where an order is in its life (SPEC §3).
    OrderStatus, "order status" {
        Unpaid => "unpaid",
        /// A payment holds it (TCC tried it; or the wallet's debit message
        /// is on its way): neither cancel nor the timeout closes it.
        Paying => "paying",
        Paid => "paid",
        Closed => "closed",
    }
}

stored_enum! {
    /// Why a closed order closed.
    CloseReason, "close reason" {
        /// The buyer cancelled it.
        Cancelled => "cancelled",
        /// It stayed unpaid past `expires_at`.
        Timeout => "timeout",
    }
}

stored_enum! {
    /// Why an admission did not become an order; also the `reason` of the
    /// buyer's `failed` result.
    FailReason, "admission failure reason" {
        /// MySQL's stock guard refused: the sale has no stock left.
        SoldOut => "sold_out",
        /// No such sale in MySQL.
        UnknownSale => "unknown_sale",
        /// The buyer already has an order for this sale.
        Duplicate => "duplicate",
        /// The reservation was released before the message arrived (the
        /// gateway rolled back after a failed publish, or it timed out): the
        /// buyer was told no, and its unit is back in stock.
        Released => "released",
    }
}

stored_enum! {
    /// What became of a buyer's admission, as result polling answers it
    /// (`GET /sales/{id}/result`); the workers store `success` or `failed`
    /// in the buyer's result key.
    ResultStatus, "result status" {
        /// An order exists.
        Success => "success",
        /// Admitted, not settled yet.
        Queued => "queued",
        /// Settled without an order.
        Failed => "failed",
        /// Never admitted.
        None => "none",
    }
}

stored_enum! {
    /// Where a payment transaction is (the coordinator's log). It only
    /// moves forward, each step a guarded update.
    TxState, "payment transaction state" {
        /// Branches are being tried / prepared / requested.
        Started => "started",
        /// Decided: every branch commits (recovery finishes it).
        Committing => "committing",
        /// Decided: every branch is undone (recovery finishes it).
        Aborting => "aborting",
        Committed => "committed",
        Aborted => "aborted",
    }
}

stored_enum! {
    /// Why a payment transaction was aborted.
    AbortReason, "payment abort reason" {
        /// The wallet's balance did not cover the order.
        InsufficientFunds => "insufficient_funds",
        /// The order was not the buyer's unpaid, unexpired order any more
        /// (paid, closed, expired, or held by another payment).
        OrderNotPayable => "order_not_payable",
        /// No wallet instance answered.
        WalletUnavailable => "wallet_unavailable",
        /// The wallet refused the call (a bug or a misconfiguration: the
        /// service token, a malformed request).
        WalletRefused => "wallet_refused",
        /// It stayed open past `payment.transaction_timeout_ms`; recovery
        /// ended it.
        Timeout => "timeout",
    }
}

stored_enum! {
    /// The phase a TCC branch reached (its fence).
    FencePhase, "TCC fence phase" {
        Try => "try",
        Confirm => "confirm",
        Cancel => "cancel",
    }
}

stored_enum! {
    /// A movement of money in the wallet's ledger.
    LedgerKind, "ledger kind" {
        /// A top-up.
        Credit => "credit",
        /// TCC Try: balance to frozen.
        Freeze => "freeze",
        /// TCC Cancel: frozen back to balance.
        Unfreeze => "unfreeze",
        /// Money spent on an order (from frozen in TCC, from the balance
        /// otherwise).
        Debit => "debit",
        /// A debit given back.
        Refund => "refund",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<T>(all: &[T])
    where
        T: Copy + PartialEq + fmt::Debug + fmt::Display + FromStr<Err = UnknownValue>,
    {
        for v in all {
            assert_eq!(v.to_string().parse::<T>(), Ok(*v));
        }
    }

    #[test]
    fn every_value_round_trips() {
        round_trips(OrderStatus::ALL);
        round_trips(CloseReason::ALL);
        round_trips(FailReason::ALL);
        round_trips(ResultStatus::ALL);
        round_trips(TxState::ALL);
        round_trips(AbortReason::ALL);
        round_trips(FencePhase::ALL);
        round_trips(LedgerKind::ALL);
        assert_eq!(OrderStatus::Unpaid.as_str(), "unpaid");
        assert_eq!(CloseReason::Timeout.as_str(), "timeout");
        assert_eq!(FailReason::UnknownSale.as_str(), "unknown_sale");
    }

    /// A value renamed here, or a typo in a procedure, fails here rather
    /// than in a payment.
    #[test]
    fn every_word_the_procedures_quote_is_a_known_value() {
        let procedures = [
            include_str!("../../migrations/20261207000001_fence_procedures.sql"),
            include_str!("../../migrations/20261207000002_order_branch_steps.sql"),
            include_str!("../../migrations/wallet/20261207000002_wallet_branch_steps.sql"),
            include_str!("../../migrations/20261208000001_order_step_groups.sql"),
            include_str!("../../migrations/wallet/20261208000001_wallet_step_groups.sql"),
            include_str!("../../migrations/20261208000002_log_move_group.sql"),
            include_str!("../../migrations/wallet/20261209000001_message_debit_group.sql"),
            include_str!("../../migrations/20261210000001_message_settle_group.sql"),
            include_str!("../../migrations/20261211000001_set_based_steps.sql"),
            include_str!("../../migrations/wallet/20261211000001_wallet_set_steps.sql"),
        ];
        // What the procedures answer (their own vocabulary, parsed in
        // `fence`, `order_branch`, `wallet::tcc` and `wallet::message`) and
        // the branch names.
        let own = [
            "fresh",
            "suspended",
            "apply",
            "repeat",
            "empty_rollback",
            "refused",
            "done",
            "held",
            "not_decided",
            "frozen",
            "insufficient_funds",
            "moved",
            "stayed",
            "debited",
            "cancelled",
            "duplicate",
            "unknown",
            "given_up",
            // No abort reason given: the row keeps its own.
            "",
            "order",
            "wallet",
            "message",
        ];
        let mut known: Vec<String> = own.iter().map(|w| w.to_string()).collect();
        known.extend(OrderStatus::ALL.iter().map(|v| v.to_string()));
        known.extend(TxState::ALL.iter().map(|v| v.to_string()));
        known.extend(FencePhase::ALL.iter().map(|v| v.to_string()));
        known.extend(LedgerKind::ALL.iter().map(|v| v.to_string()));
        let mut checked = 0;
        for sql in procedures {
            // Comments may hold apostrophes: code only.
            let code: String = sql
                .lines()
                .map(|line| line.split("--").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            for quoted in code.split('\'').skip(1).step_by(2) {
                let is_word = quoted.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
                if is_word {
                    assert!(
                        known.iter().any(|k| k == quoted),
                        "unknown value '{quoted}'"
                    );
                    checked += 1;
                }
            }
        }
        assert!(checked > 30, "only {checked} quoted words found");
    }

    #[test]
    fn unknown_text_is_an_error_naming_it() {
        let err = "refunded".parse::<OrderStatus>().unwrap_err();
        assert_eq!(
            err,
            UnknownValue {
                kind: "order status",
                value: "refunded".into()
            }
        );
        assert!(err.to_string().contains("refunded"));
        assert!("".parse::<CloseReason>().is_err());
        assert!("Sold_Out".parse::<FailReason>().is_err(), "exact text only");
    }

    #[test]
    fn json_is_the_stored_text() {
        let v = serde_json::to_value([OrderStatus::Paid]).unwrap();
        assert_eq!(v, serde_json::json!(["paid"]));
        let v = serde_json::to_value(FailReason::SoldOut).unwrap();
        assert_eq!(v, "sold_out");
        let back: ResultStatus = serde_json::from_str("\"failed\"").unwrap();
        assert_eq!(back, ResultStatus::Failed);
        assert!(serde_json::from_str::<ResultStatus>("\"lost\"").is_err());
    }
}
