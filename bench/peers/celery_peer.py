"""Python Celery as a peer in warren-bench's runs (`--peers celery`).

    python3 bench/peers/celery_peer.py publish --url URL --queue Q -n N
    python3 bench/peers/celery_peer.py drain   --url URL --queue Q -n N

Prints one line, `rate <tasks per second>`. Same broker as warren's sides;
Celery declares its own durable classic queue (no `x-max-priority`) and
publishes persistent messages. `publish`: `apply_async` with publisher
confirms (`confirm_publish`), one at a time, as Celery does. `drain`: N tasks
are published first (not timed), then a solo worker with late acks (ack after
the task, like warren) and prefetch `--prefetch` (default 64, warren's
default; 0: Celery's own, 4) runs a no-op task; timed from the first task's
start to the Nth (warren-bench measures the drain from the broker's queue
count instead).
"""

import argparse
import os
import sys
import time

from celery import Celery
from kombu import Queue

BODY = {
    "user_id": 4242,
    "action": "bench.drain",
    "email": "ada@example.com",
    "tags": ["alpha", "beta", "gamma"],
    "locale": "en-GB",
    "seq": 1234567,
}

args = argparse.ArgumentParser()
args.add_argument("mode", choices=["publish", "drain"])
args.add_argument("--url", required=True)
args.add_argument("--queue", required=True)
args.add_argument("-n", type=int, required=True)
# drain: the worker's prefetch (solo pool: the multiplier is the prefetch);
# 0: Celery's default (multiplier 4).
args.add_argument("--prefetch", type=int, default=64)
a = args.parse_args()

app = Celery("bench", broker=a.url)
app.conf.update(
    task_default_queue=a.queue,
    task_queues=[Queue(a.queue, durable=True)],
    broker_transport_options={"confirm_publish": a.mode == "publish"},
    task_acks_late=True,
    task_ignore_result=True,
    worker_hijack_root_logger=False,
    worker_log_color=False,
    broker_connection_retry_on_startup=True,
)

if a.prefetch > 0:
    app.conf.worker_prefetch_multiplier = a.prefetch

seen = {"n": 0, "t0": 0.0}


@app.task(name="bench.noop")
def noop(**_payload):
    seen["n"] += 1
    if seen["n"] == 1:
        seen["t0"] = time.perf_counter()
    elif seen["n"] == a.n:
        rate = (a.n - 1) / (time.perf_counter() - seen["t0"])
        print(f"rate {rate:.0f}", flush=True)
        os._exit(0)


if a.mode == "publish":
    start = time.perf_counter()
    for _ in range(a.n):
        noop.apply_async(kwargs=BODY)
    print(f"rate {a.n / (time.perf_counter() - start):.0f}", flush=True)
else:
    with app.producer_or_acquire() as producer:
        for _ in range(a.n):
            noop.apply_async(kwargs=BODY, producer=producer)
    sys.argv = ["celery"]
    app.worker_main(
        [
            "worker",
            "--pool=solo",
            "--loglevel=WARNING",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            "-Q",
            a.queue,
        ]
    )
