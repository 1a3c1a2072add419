//! The sweeper's Redis lock against a real Redis: mutual exclusion between
//! contenders, takeover after a holder dies, the watchdog keeping a long
//! holder's lock, and a stale holder unable to release or renew a lock that
//! is no longer its own. Each test has its own key prefix (`TestEnv`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use seckill_contracts::testkit::TestEnv;
use seckill_workers::connections;
use seckill_workers::lock::{self, RedisLock};

async fn lock_for(env: &TestEnv, name: &str, ttl: Duration) -> RedisLock {
    let redis = connections::redis(&env.config).await.expect("redis");
    RedisLock::new(redis, &env.keys(), name, ttl)
}

/// Two contenders (separate connections, as two workers would have) race for
/// the lock 50 times; each round exactly one wins, and the loser gets the
/// lock only after the winner released it.
#[tokio::test]
async fn two_contenders_exactly_one_wins_each_round() {
    let env = TestEnv::new().await;
    let a = lock_for(&env, "race", Duration::from_secs(5)).await;
    let b = lock_for(&env, "race", Duration::from_secs(5)).await;
    let (mut a_wins, mut b_wins) = (0, 0);
    for _ in 0..50 {
        let (ga, gb) = tokio::join!(a.try_acquire(), b.try_acquire());
        let (ga, gb) = (ga.expect("a reaches redis"), gb.expect("b reaches redis"));
        let winner = match (ga, gb) {
            (Some(g), None) => {
                a_wins += 1;
                g
            }
            (None, Some(g)) => {
                b_wins += 1;
                g
            }
            (Some(_), Some(_)) => panic!("both contenders hold the lock"),
            (None, None) => panic!("nobody got a free lock"),
        };
        assert!(winner.is_held());
        // While held, a third attempt from either side fails.
        assert!(a.try_acquire().await.expect("redis").is_none());
        assert!(
            winner.release().await.expect("release"),
            "released its own lock"
        );
    }
    assert_eq!(a_wins + b_wins, 50);
    println!("rounds won: a {a_wins}, b {b_wins}");
    env.cleanup().await;
}

/// Many tasks doing guarded "work" at once: the work section is never entered
/// by two of them together.
#[tokio::test]
async fn critical_section_never_shared() {
    let env = TestEnv::new().await;
    let lock = lock_for(&env, "section", Duration::from_secs(5)).await;
    let inside = Arc::new(AtomicUsize::new(0));
    let entered = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (lock, inside, entered) = (lock.clone(), inside.clone(), entered.clone());
            tokio::spawn(async move {
                let deadline = Instant::now() + Duration::from_secs(3);
                while Instant::now() < deadline {
                    if let Some(guard) = lock.try_acquire().await.expect("redis") {
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0, "two holders");
                        entered.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        inside.fetch_sub(1, Ordering::SeqCst);
                        guard.release().await.expect("release");
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    assert!(entered.load(Ordering::SeqCst) > 10, "the lock was usable");
    env.cleanup().await;
}

/// A holder that dies (its guard dropped without release: no watchdog, no
/// delete) keeps the other out until the ttl runs out, then the other takes
/// over.
#[tokio::test]
async fn dead_holder_frees_the_lock_after_ttl() {
    let env = TestEnv::new().await;
    let ttl = Duration::from_millis(600);
    let a = lock_for(&env, "dead", ttl).await;
    let b = lock_for(&env, "dead", ttl).await;
    let died_at = {
        let guard = a.try_acquire().await.expect("redis").expect("free lock");
        drop(guard); // the process "dies": nothing renews, nothing deletes
        Instant::now()
    };
    let taken_at = loop {
        if let Some(g) = b.try_acquire().await.expect("redis") {
            let at = Instant::now();
            g.release().await.expect("release");
            break at;
        }
        assert!(
            died_at.elapsed() < Duration::from_secs(5),
            "never taken over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let waited = taken_at - died_at;
    assert!(
        waited >= ttl - Duration::from_millis(50),
        "taken over too early: {waited:?}"
    );
    assert!(
        waited < ttl + Duration::from_millis(500),
        "taken over too late: {waited:?}"
    );
    println!("takeover after {waited:?} (ttl {ttl:?})");
    env.cleanup().await;
}

/// The watchdog keeps a 300 ms lock alive through a 1.5 s "sweep" while a
/// contender keeps trying and failing; once released, the contender wins.
#[tokio::test]
async fn watchdog_keeps_a_long_holders_lock() {
    let env = TestEnv::new().await;
    let ttl = Duration::from_millis(300);
    let a = lock_for(&env, "long", ttl).await;
    let b = lock_for(&env, "long", ttl).await;
    let guard = a.try_acquire().await.expect("redis").expect("free lock");
    let start = Instant::now();
    let mut attempts = 0;
    while start.elapsed() < Duration::from_millis(1500) {
        assert!(
            b.try_acquire().await.expect("redis").is_none(),
            "contender got the lock after {:?}",
            start.elapsed()
        );
        attempts += 1;
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(attempts > 20);
    assert!(guard.is_held(), "watchdog lost the lock");
    assert!(guard.release().await.expect("release"));
    assert!(b.try_acquire().await.expect("redis").is_some());
    env.cleanup().await;
}

/// A stale holder (its ttl ran out and B took the lock) can neither delete
/// nor extend B's lock; B's lock survives both attempts with B's owner value.
#[tokio::test]
async fn stale_holder_cannot_release_or_renew() {
    let env = TestEnv::new().await;
    let key = env.keys().lock("stale");
    let mut redis = connections::redis(&env.config).await.expect("redis");
    let (stale, fresh) = (lock::new_owner(), lock::new_owner());
    assert!(
        lock::acquire_raw(&mut redis, &key, &stale, Duration::from_millis(100))
            .await
            .expect("redis")
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        lock::acquire_raw(&mut redis, &key, &fresh, Duration::from_secs(10))
            .await
            .expect("redis")
    );

    assert!(!lock::release_raw(&mut redis, &key, &stale)
        .await
        .expect("redis"));
    assert!(
        !lock::renew_raw(&mut redis, &key, &stale, Duration::from_secs(60))
            .await
            .expect("redis")
    );
    let holder: Option<String> = redis.get(&key).await.expect("get");
    assert_eq!(holder.as_deref(), Some(fresh.as_str()));
    let pttl: i64 = redis.pttl(&key).await.expect("pttl");
    assert!(
        pttl > 0 && pttl <= 10_000,
        "stale renew changed the ttl: {pttl}"
    );

    assert!(lock::release_raw(&mut redis, &key, &fresh)
        .await
        .expect("redis"));
    let exists: bool = redis.exists(&key).await.expect("exists");
    assert!(!exists);
    env.cleanup().await;
}

/// When the lock is taken from under a holder (it expired during a stall and
/// someone else set it), the watchdog notices and `is_held` turns false, so a
/// holder that checks it stops; its release then reports it no longer held.
#[tokio::test]
async fn holder_learns_it_lost_the_lock() {
    let env = TestEnv::new().await;
    let ttl = Duration::from_millis(300);
    let a = lock_for(&env, "lost", ttl).await;
    let guard = a.try_acquire().await.expect("redis").expect("free lock");
    let mut redis = env.redis().await;
    let _: () = redis.set(a.key(), "someone-else").await.expect("overwrite");
    let start = Instant::now();
    while guard.is_held() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "watchdog never noticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !guard.release().await.expect("redis"),
        "released someone else's lock"
    );
    let holder: Option<String> = redis.get(a.key()).await.expect("get");
    assert_eq!(holder.as_deref(), Some("someone-else"));
    env.cleanup().await;
}
