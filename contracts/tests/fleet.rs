//! Fleet reports against the real Redis: what is published reads back,
//! silence makes a member down and then forgotten, and an entry that does
//! not parse is skipped, never fatal.

use redis::AsyncCommands;
use seckill_contracts::clock::unix_ms;
use seckill_contracts::fleet::{self, MemberReport, Role, FORGET_AFTER, LIVE_WITHIN};
use seckill_contracts::redis_client::RedisConn;
use seckill_contracts::testkit::TestEnv;

#[tokio::test]
async fn members_read_back_with_liveness_and_stale_ones_are_forgotten() {
    let env = TestEnv::new().await;
    let keys = env.keys();
    let mut conn = RedisConn::connect(&env.config.redis).await.unwrap();

    let mut live = MemberReport::new(Role::Gateway, "edge-1:8080", 1);
    live.decisions.insert(7, [("queued".to_string(), 3)].into());
    fleet::publish(&mut conn, &keys, &mut live).await.unwrap();
    let mut worker = MemberReport::new(Role::Worker, "app-1:9191", 1);
    fleet::publish(&mut conn, &keys, &mut worker).await.unwrap();

    // Written directly with old stamps: one silent past LIVE_WITHIN, one
    // past FORGET_AFTER, and one entry a newer version might write.
    let mut raw = env.redis().await;
    let write_old = |id: &str, ago: u64| {
        let mut r = MemberReport::new(Role::Api, id, 1);
        r.seen_at_ms = unix_ms() - ago;
        (format!("api:{id}"), serde_json::to_string(&r).unwrap())
    };
    let (down_field, down) = write_old("app-2:8081", LIVE_WITHIN.as_millis() as u64 + 2_000);
    let (gone_field, gone) = write_old("app-3:8081", FORGET_AFTER.as_millis() as u64 + 2_000);
    let key = keys.fleet_members();
    let _: () = raw
        .hset_multiple(
            &key,
            &[
                (down_field.as_str(), down.as_str()),
                (gone_field.as_str(), gone.as_str()),
                ("api:future", "{\"role\":\"api\",\"id\":42}"),
            ],
        )
        .await
        .unwrap();

    let members = fleet::members(&mut conn, &keys).await.unwrap();
    let seen: Vec<(&str, bool)> = members
        .iter()
        .map(|m| (m.report.id.as_str(), m.live))
        .collect();
    assert_eq!(
        seen,
        [
            ("edge-1:8080", true),
            ("app-2:8081", false),
            ("app-1:9191", true)
        ],
        "by role then id; the silent one is down; the forgotten and broken are left out"
    );
    assert_eq!(members[0].report.decisions[&7]["queued"], 3);
    let left: Vec<String> = raw.hkeys(&key).await.unwrap();
    assert!(
        !left.contains(&gone_field),
        "a long-silent member is removed"
    );
    assert!(left.contains(&down_field));
    env.cleanup().await;
}
