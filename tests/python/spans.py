"""Sends real OpenTelemetry spans to pipeprobe with the OpenTelemetry Python SDK and its OTLP
exporters, from workloads whose kernel-side answer is known.

    spans.py SCENARIO --protocol http|grpc --endpoint URL --service NAME

Scenarios (each prints `TRACE <hex trace id>` per span, then exits):
    breakdown  one 300 ms span `synthesize` on the main thread, pinned with 3 busy threads to
               one CPU: 100 ms asleep, then ~200 ms of work competing for the CPU
    quiet      one ~100 ms span `transcribe` of work alone on an idle CPU
    syscalls   one 500 ms span `tokenize` of getppid calls alone on an idle CPU (none blocks, so
               the thread does not leave the CPU), then prints `SYSCALLS n`, how many it made
    foreign    one span claiming process.pid 999999 (a process the agent does not know)
    burst N    N short spans `tick`
    gpu        one 300 ms span `generate`, started once --wait-file exists (the test puts this
               process on a fake GPU first; it prints `PID n` when it is ready for that)
    upload     one span `upload`: connects to --connect HOST:PORT, sends --bytes and waits
               for the one-byte reply, then prints `RETRANS n`, the socket's retransmitted
               segments from TCP_INFO (as `ss -ti` shows them); then one quiet span `idle`
               while the connection stays open
The busy work is hashlib on large buffers, which releases the GIL: threads compete for the
CPU, not for the interpreter lock.
"""
import argparse
import hashlib
import os
import socket
import struct
import sys
import threading
import time

from opentelemetry import trace
from opentelemetry.sdk.resources import ProcessResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

BUF = b"\x5a" * (4 << 20)


def work(seconds):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        hashlib.sha256(BUF).digest()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("scenario")
    p.add_argument("count", nargs="?", type=int, default=1)
    p.add_argument("--protocol", required=True)
    p.add_argument("--endpoint", required=True)
    p.add_argument("--service", required=True)
    p.add_argument("--cpu", type=int, default=1)
    p.add_argument("--wait-file")
    p.add_argument("--connect")
    p.add_argument("--bytes", type=int, default=4 << 20)
    a = p.parse_args()

    attrs = {"service.name": a.service}
    resource = Resource.create(attrs).merge(ProcessResourceDetector().detect())
    if a.scenario == "foreign":
        resource = resource.merge(Resource({"process.pid": 999999}))
    if a.protocol == "http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=a.endpoint, timeout=5)
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=a.endpoint, insecure=True, timeout=5)
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("pipeprobe-tests")

    # Threads created from here inherit the main thread's CPU.
    os.sched_setaffinity(0, {a.cpu})
    # The agent lists a process's threads once a second: let it see this one first.
    time.sleep(1.5)

    def span(name, body, report=True):
        with tracer.start_as_current_span(name) as s:
            s.set_attribute("thread.id", threading.get_native_id())
            body()
            if report:
                print("TRACE %032x" % s.get_span_context().trace_id, flush=True)

    if a.scenario == "breakdown":
        # A service's first span only marks its process: the agent takes off-CPU stacks for the
        # span flamegraphs of processes that sent a span lately, as a service always has.
        span("warmup", lambda: None, report=False)
        time.sleep(0.2)
        stop = threading.Event()

        def busy():
            while not stop.is_set():
                hashlib.sha256(BUF).digest()

        def body():
            time.sleep(0.1)
            for _ in range(3):
                threading.Thread(target=busy, daemon=True).start()
            work(0.2)

        span("synthesize", body)
        stop.set()
    elif a.scenario == "quiet":
        span("transcribe", lambda: work(0.1))
    elif a.scenario == "syscalls":
        made = [0]

        def loop():
            # time.monotonic is the vDSO's: the only syscall in the loop is getppid, which glibc
            # does not cache.
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                os.getppid()
                made[0] += 1

        span("tokenize", loop)
        print("SYSCALLS %d" % made[0], flush=True)
    elif a.scenario == "foreign":
        span("translate", lambda: time.sleep(0.01))
    elif a.scenario == "gpu":
        print("PID %d" % os.getpid(), flush=True)
        deadline = time.monotonic() + 10
        while not os.path.exists(a.wait_file) and time.monotonic() < deadline:
            time.sleep(0.02)
        span("generate", lambda: time.sleep(0.3))
    elif a.scenario == "upload":
        host, port = a.connect.rsplit(":", 1)
        conn = []

        def upload():
            c = socket.create_connection((host, int(port)), timeout=20)
            conn.append(c)
            c.sendall(b"\x00" * a.bytes)
            c.recv(1)
            # struct tcp_info: tcpi_total_retrans is the u32 at offset 100.
            info = c.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            print("RETRANS %d" % struct.unpack_from("I", info, 100)[0], flush=True)

        span("upload", upload)
        span("idle", lambda: time.sleep(0.2))
        conn[0].close()
    elif a.scenario == "burst":
        for _ in range(a.count):
            span("tick", lambda: None)
    else:
        sys.exit("unknown scenario " + a.scenario)
    provider.shutdown()
    # A service outlives its spans: the agent reads the names of its code from the live process
    # when it draws a slow span's flamegraph.
    time.sleep(1.0)


main()
