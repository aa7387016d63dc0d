"""Python workloads with known answers for pipeprobe's flamegraph tests.

    work.py hot      hot_a does 3x the work of hot_b, in turn
    work.py threads  two threads, each spinning in its own function
    work.py zlib     compress_big compresses a large buffer with zlib, over and over
    work.py sleep    nap sleeps 200 ms per call, twitch 1 ms
    work.py many     2,000 generated functions with long loops, called in turn: more distinct
                     (function, line) stacks than one capture keeps
    work.py bench SECS DELAY_MS
                     the hot loop for SECS after DELAY_MS, then prints OPS_PER_SEC (rounds/s)
                     and exits (cargo xtask bench)

Prints READY once running; runs until killed (but bench).
"""
import random
import sys
import threading
import time
import zlib


def spin(n):
    x = 0
    for i in range(n):
        x += i * i
    return x


def hot_a(k):
    return spin(30000 * k)


def hot_b(k):
    return spin(10000 * k)


def thread_one():
    while True:
        spin(10000)


def thread_two():
    while True:
        spin(10000)


def compress_big(data):
    return zlib.compress(data, 9)


def nap():
    time.sleep(0.2)


def twitch():
    time.sleep(0.001)


def main():
    mode = sys.argv[1]
    if mode == "hot":
        print("READY", flush=True)
        # The same random size for both each round: 3x on average, and no fixed period for a
        # fixed-rate sampler to alias with.
        rng = random.Random(1)
        while True:
            k = rng.randint(1, 8)
            hot_a(k)
            hot_b(k)
    elif mode == "threads":
        for fn in (thread_one, thread_two):
            threading.Thread(target=fn, daemon=True).start()
        print("READY", flush=True)
        while True:
            time.sleep(1)
    elif mode == "zlib":
        # Random-looking but compressible: deflate works hard on it.
        data = bytes((i * 7919 + (i >> 5)) % 251 for i in range(1 << 20))
        print("READY", flush=True)
        while True:
            compress_big(data)
    elif mode == "many":
        body = "".join(f"        x = (x + j * {k}) % 7919\n" for k in range(1, 11))
        src = "".join(
            f"def f{i}(n):\n    x = 0\n    for j in range(n):\n{body}    return x\n"
            for i in range(2000)
        )
        ns = {}
        exec(compile(src, "many.py", "exec"), ns)
        fns = [ns[f"f{i}"] for i in range(2000)]
        print("READY", flush=True)
        while True:
            for f in fns:
                f(20)
    elif mode == "bench":
        secs, delay = float(sys.argv[2]), float(sys.argv[3]) / 1000
        time.sleep(delay)
        start = time.monotonic()
        rounds = 0
        while time.monotonic() - start < secs:
            hot_a(1)
            hot_b(1)
            rounds += 1
        print(f"OPS_PER_SEC {rounds / (time.monotonic() - start):.1f}", flush=True)
        return
    elif mode == "sleep":
        print("READY", flush=True)
        while True:
            nap()
            for _ in range(20):
                twitch()
    else:
        sys.exit(f"unknown mode {mode}")


main()
