//! A process cut off mid-transaction must not hold a sale's row locks for
//! hours: MariaDB ends a session idle inside a transaction after
//! `database.idle_transaction_timeout_secs`, and another connection gets
//! the lock.

use std::time::{Duration, Instant};

use seckill_contracts::testkit::TestEnv;
use seckill_workers::connections;

#[tokio::test]
async fn a_transaction_left_idle_gives_its_row_locks_back() {
    let env = TestEnv::new().await;
    let mut config = env.config.database.clone();
    config.idle_transaction_timeout_secs = 1;
    let db = connections::mysql(&config).await.unwrap();
    sqlx::query("CREATE TABLE locked (id INT PRIMARY KEY, n INT NOT NULL)")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("INSERT INTO locked VALUES (1, 0)")
        .execute(&db)
        .await
        .unwrap();

    // A "worker" takes the row lock and then goes silent, as one whose
    // host dropped off the network does.
    let mut stalled = db.begin().await.unwrap();
    sqlx::query("UPDATE locked SET n = n + 1 WHERE id = 1")
        .execute(&mut *stalled)
        .await
        .unwrap();

    // Another worker gets the lock within the timeout, not after
    // innodb_lock_wait_timeout (50 s) or never.
    let started = Instant::now();
    let other = connections::mysql(&config).await.unwrap();
    sqlx::query("UPDATE locked SET n = n + 10 WHERE id = 1")
        .execute(&other)
        .await
        .unwrap();
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(10),
        "waited {waited:?} for the lock"
    );

    // The silent transaction was rolled back with its session.
    assert!(
        sqlx::query("SELECT 1")
            .execute(&mut *stalled)
            .await
            .is_err(),
        "the idle session was ended"
    );
    let n: i32 = sqlx::query_scalar("SELECT n FROM locked WHERE id = 1")
        .fetch_one(&other)
        .await
        .unwrap();
    assert_eq!(n, 10, "the idle transaction's update was rolled back");
    drop(stalled);
    db.close().await;
    other.close().await;
    env.cleanup().await;
}
