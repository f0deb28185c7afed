#!/usr/bin/env python3
"""Traffic shaper in front of a real smtp-sink, for bench/throttled-platform.

Listens on LISTEN and, while the throttle phase lasts, answers a fraction P of
the incoming connections with a greeting of
    421 4.7.0 Too many connections, try again later
and closes them, as an overloaded platform does. Every other connection is
proxied byte for byte, both ways, to the real smtp-sink at UPSTREAM. It shapes
traffic; it does not imitate the gateway under test or the sink.

The throttle phase lasts until the directory COUNT_DIR (the sink's -d dump
folder, one file per transaction) holds UNTIL files. With P = 0 nothing is
refused, so the un-throttled baseline pays the same proxy overhead.

The decisions come from random.Random(SEED): the same sequence of draws in
every run. On SIGTERM or SIGINT it writes its counters as JSON to STATS.
"""
import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time

GREETING_421 = b"421 4.7.0 Too many connections, try again later\r\n"


class Front:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.throttling = args.p > 0 and args.until > 0
        self.started = time.monotonic()
        self.throttle_end_s = None
        self.connections = 0
        self.refused = 0
        self.proxied = 0
        self.upstream_errors = 0
        self.tasks = set()

    def count(self):
        try:
            return sum(1 for _ in os.scandir(self.args.count_dir))
        except FileNotFoundError:
            return 0

    async def watch(self):
        while self.throttling:
            if self.count() >= self.args.until:
                self.throttling = False
                self.throttle_end_s = time.monotonic() - self.started
                print(f"throttle-front: throttling ends after {self.throttle_end_s:.1f}s "
                      f"({self.refused} of {self.connections} connections refused)",
                      file=sys.stderr, flush=True)
                return
            await asyncio.sleep(0.05)

    async def handle(self, reader, writer):
        self.connections += 1
        if self.throttling and self.rng.random() < self.args.p:
            self.refused += 1
            try:
                writer.write(GREETING_421)
                await writer.drain()
            except ConnectionError:
                pass
            writer.close()
            return
        try:
            up_r, up_w = await asyncio.open_connection(*self.args.upstream)
        except OSError:
            self.upstream_errors += 1
            writer.close()
            return
        self.proxied += 1
        a = asyncio.ensure_future(pipe(reader, up_w))
        b = asyncio.ensure_future(pipe(up_r, writer))
        try:
            done, pending = await asyncio.wait({a, b}, return_when=asyncio.FIRST_COMPLETED)
            # One side ended. A clean EOF was passed on as a half-close; give the
            # other direction a moment to finish (the 221 after QUIT), then close.
            if pending:
                await asyncio.wait(pending, timeout=5)
        except asyncio.CancelledError:
            pass  # shutting down
        finally:
            for t in (a, b):
                t.cancel()
            for w in (writer, up_w):
                w.close()

    def stats(self):
        return {
            "p": self.args.p,
            "seed": self.args.seed,
            "until": self.args.until,
            "connections": self.connections,
            "refused": self.refused,
            "proxied": self.proxied,
            "upstream_errors": self.upstream_errors,
            "throttle_end_s": None if self.throttle_end_s is None else round(self.throttle_end_s, 2),
            "still_throttling": self.throttling,
        }


async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        return


def hostport(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", type=hostport, required=True)
    ap.add_argument("--upstream", type=hostport, required=True)
    ap.add_argument("--p", type=float, default=0.2, help="fraction of connections refused")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--count-dir", required=True)
    ap.add_argument("--until", type=int, required=True,
                    help="throttle while COUNT_DIR holds fewer files than this")
    ap.add_argument("--stats", required=True)
    args = ap.parse_args()
    front = Front(args)
    server = await asyncio.start_server(front.handle, *args.listen, backlog=1000, reuse_address=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.ensure_future(front.watch())
    await stop.wait()
    watcher.cancel()
    server.close()
    with open(args.stats + ".tmp", "w") as f:
        json.dump(front.stats(), f)
    os.replace(args.stats + ".tmp", args.stats)


if __name__ == "__main__":
    asyncio.run(main())
