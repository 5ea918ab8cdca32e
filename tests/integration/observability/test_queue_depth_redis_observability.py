"""Queue depth from a real Redis broker: messages sent the way the API sends them (Celery
``send_task`` by name, with and without a priority) are counted per queue by ``/metrics``'s reader."""

from __future__ import annotations

import pytest

from services.observability import redis_queue_depths

pytestmark = pytest.mark.redis


def test_redis_queue_depth_counts_messages_per_queue(redis_url):
    import celery
    import redis

    broker = redis_url.rsplit("/", 1)[0] + "/13"
    client = redis.Redis.from_url(broker)
    client.flushdb()
    try:
        producer = celery.Celery("probe", broker=broker)
        for _ in range(3):
            producer.send_task("touchstone.infer_shard", args=[1], queue="gpu")
        producer.send_task("touchstone.infer_shard", args=[2], queue="gpu", priority=6)  # a priority list
        producer.send_task("touchstone.score", args=[1], queue="cpu")
        depths, unacked = redis_queue_depths(broker)
        assert depths == {"gpu": 4, "cpu": 1}
        assert unacked == 0
    finally:
        client.flushdb()
