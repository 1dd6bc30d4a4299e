//! The queue on a local three-master Redis Cluster: every key of a queue shares one hash tag, so
//! its scripts run on whichever master owns that slot.

use std::collections::BTreeMap;
use std::time::Duration;

use aiq::domain::{JobKind, Tier};
use aiq_testkit::localsvc::LocalRedisCluster;

use crate::harness::{ORG_A, ORG_B, TestCtx};

/// The master port serving each of a few queue prefixes, one prefix per master.
async fn prefixes_on_every_master(cluster: &LocalRedisCluster) -> BTreeMap<u16, String> {
    let ports = cluster.ports();
    let client = redis::Client::open(format!("redis://127.0.0.1:{}/", ports[0])).unwrap();
    let mut c = aiq::redis_conn::multiplexed(&client).await.unwrap();
    let slots: Vec<(i64, i64, (String, i64))> = {
        let raw: Vec<redis::Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut c)
            .await
            .unwrap();
        raw.into_iter()
            .map(|r| {
                // [start, end, [ip, port, id, ...], replicas...]
                let row: Vec<redis::Value> = redis::from_redis_value(r).unwrap();
                let start: i64 = redis::from_redis_value(row[0].clone()).unwrap();
                let end: i64 = redis::from_redis_value(row[1].clone()).unwrap();
                let master: Vec<redis::Value> = redis::from_redis_value(row[2].clone()).unwrap();
                let ip: String = redis::from_redis_value(master[0].clone()).unwrap();
                let port: i64 = redis::from_redis_value(master[1].clone()).unwrap();
                (start, end, (ip, port))
            })
            .collect()
    };
    let mut by_port = BTreeMap::new();
    for i in 0.. {
        let prefix = format!("c{i}-{}", uuid::Uuid::new_v4().simple());
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(format!("{{{prefix}}}:job:1"))
            .query_async(&mut c)
            .await
            .unwrap();
        let port = slots
            .iter()
            .find(|(s, e, _)| *s <= slot && slot <= *e)
            .unwrap()
            .2
            .1 as u16;
        by_port.entry(port).or_insert(prefix);
        if by_port.len() == ports.len() {
            return by_port;
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_and_the_worker_run_on_a_three_master_redis_cluster() {
    let cluster = LocalRedisCluster::start("it-cluster").expect("a local Redis Cluster");
    let prefixes = prefixes_on_every_master(&cluster).await;
    assert_eq!(prefixes.len(), 3);
    for (port, prefix) in prefixes {
        let ctx = TestCtx::with(&[
            ("AIQ_REDIS_URL", &cluster.urls()),
            ("AIQ_REDIS_CLUSTER", "true"),
            ("AIQ_QUEUE_PREFIX", &prefix),
        ])
        .await;
        for tier in [Tier::EnterprisePlus, Tier::Trial] {
            for org in [ORG_A, ORG_B] {
                ctx.enqueue_both_kinds(tier, org, "on a cluster").await;
            }
        }
        ctx.enqueue(JobKind::LlmComplete, Tier::Trial, ORG_A, "not json", 0)
            .await;
        let stats = ctx.queue.stats().await.unwrap();
        assert_eq!(stats.waiting["enterprise_plus"], 4, "master {port}");
        let worker = ctx.start_worker();
        ctx.wait_settled(Duration::from_secs(30)).await;
        worker.stop().await;
        let done = ctx
            .scalar_i64("SELECT count(*) FROM ai_processing_results WHERE status = 'completed'")
            .await;
        assert_eq!(done, 8, "master {port}");
        let stats = ctx.queue.stats().await.unwrap();
        assert_eq!(stats.dead, 1, "master {port}");
        assert_eq!(stats.counters["done"], 8, "master {port}");
        assert_eq!(ctx.queue.dead_all(true).await.unwrap(), 1, "master {port}");
    }
}
