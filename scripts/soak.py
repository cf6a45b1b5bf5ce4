#!/usr/bin/env python3
"""A bounded loopback soak test of a running `crosskv serve`.

N client threads hammer the OpenAI API for T minutes with a seeded mix of requests:
plain and streaming `/v1/completions` and `/v1/chat/completions`, streams the client
abandons after 1-3 chunks (cancellations), and now and then `n: 2`, `stop: ["\\n"]`
and logprobs. Prompts run from a few words to a couple of thousand, many of them
sharing long preambles, so prefix caching and chunked prefill get exercised too.
Meanwhile a sampler records the server's RSS (/proc/PID/status VmRSS) and `GET /v1/kv`
(blocks_used, num_running, num_waiting).

The run FAILS (exit 1) on:
  * any 5xx, or any 4xx other than 429 (429, the queue being full, is allowed but
    counted; every request the soak sends is valid, so another 4xx is a server bug),
  * any exception (timeout, reset connection, malformed JSON / SSE, a stream that ends
    without `data: [DONE]` or carries an error event), except the client's own
    deliberate closing of a cancelled stream,
  * the server not going idle (blocks_used, num_running, num_waiting all 0) within
    30 s of the clients stopping: a leaked KV block or a stuck request,
  * RSS growth: the median RSS of the last third of the post-warm-up samples exceeding
    that of the first third by more than --max-rss-growth-mb,
  * with --binary: the server not exiting 0 within 60 s of SIGTERM, or dying early.
Exit 2 is for usage errors. The last line is `soak: PASS ...` or `soak: FAIL <reasons>`.

Start the server itself (`PATH serve --port 0 <serve-args>`; it waits up to 10 minutes
for /health, as the first start may download the model):

  python3 scripts/soak.py --binary target/release/crosskv --clients 8 --minutes 5 \\
      --serve-arg=--max-num-seqs --serve-arg=16

or soak one already running (its PID is needed for RSS):

  python3 scripts/soak.py --url http://127.0.0.1:8000 --pid 12345 --minutes 2

The server commits its whole KV arena at start (on CPU it writes it once), so RSS
reaches its working size during the warm-up and must then stay flat: growth after that
is memory outside the arena (a leak, or an unbounded per-request cost).

Only loopback addresses are ever contacted. Python 3.11 standard library only.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
KINDS = ["completion", "completion_stream", "chat", "chat_stream", "cancel"]
KIND_WEIGHTS = [3, 3, 3, 3, 2]
EXTRAS = ["n2", "stop", "logprobs"]
EXTRA_PROB = 0.3
STARTUP_TIMEOUT_S = 600.0
IDLE_TIMEOUT_S = 30.0
SHUTDOWN_TIMEOUT_S = 60.0

# Common words: real English tokenizes at a predictable ~1-1.5 tokens a word, which
# keeps the prompt budget against max_model_len honest.
WORDS = """the of and to in is was that for on as with by he at from his an were are which
this be or has had not but first one their its new after who they have her she two been
other when there all during into school time may years more most only over city some
world would where later up such used many can state about national out known university
united then made year part three while team could under each american series well also
river game city house music film country water house garden light stone window morning
evening winter summer market road bridge village mountain forest island harbor train
letter story teacher doctor farmer painter engineer library museum kitchen table chair
paper clock bread apple orange silver golden quiet bright heavy gentle ancient modern
small large early late warm cold happy careful simple strange open close walk run build
write read carry follow remember explain describe imagine travel return discover begin""".split()


def log(msg: str) -> None:
    print(f"[soak] {msg}", file=sys.stderr, flush=True)


class UsageError(Exception):
    pass


class HttpError(Exception):
    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:200]}")
        self.status = status
        self.body = body


class ProtocolError(Exception):
    """The server answered 200 but the body is not what the API promises."""


class Target:
    """Where the server is; refuses anything that is not loopback."""

    def __init__(self, host: str, port: int, api_key: str | None, timeout: float):
        if host not in LOOPBACK:
            raise UsageError(f"refusing non-loopback host {host!r} (allowed: {', '.join(sorted(LOOPBACK))})")
        self.host, self.port, self.timeout = host, port, timeout
        self.headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    @property
    def url(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{h}:{self.port}"

    def conn(self, timeout: float | None = None) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout or self.timeout)

    def get_json(self, path: str, timeout: float = 10.0) -> tuple[int, object]:
        c = self.conn(timeout)
        try:
            c.request("GET", path, headers=self.headers)
            r = c.getresponse()
            body = r.read()
            try:
                return r.status, json.loads(body) if body else None
            except ValueError:
                return r.status, body.decode("utf-8", "replace")
        finally:
            c.close()


def listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on `port` (any address), from /proc/net/tcp{,6}."""
    inodes = set()
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                next(f, None)
                for line in f:
                    cols = line.split()
                    # local_address is ADDR:PORT in hex; state 0A is LISTEN.
                    if len(cols) > 9 and int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "0A":
                        inodes.add(cols[9])
        except OSError:
            pass
    return inodes


def pid_owns_port(pid: int, port: int) -> bool | None:
    """Whether `pid` holds the listening socket of `port`; None when that cannot be told.
    Guards against the easy mistake of passing a wrapper's PID (a shell, `nohup`, a
    `cd && server &` subshell), whose flat RSS would make the leak check meaningless."""
    inodes = listening_inodes(port)
    if not inodes:
        return None
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            return True
    return False


def parse_url(url: str) -> tuple[str, int]:
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise UsageError(f"--url {url!r}: expected http://HOST:PORT")
    try:
        port = u.port or 80
    except ValueError as e:
        raise UsageError(f"--url {url!r}: {e}") from None
    return u.hostname, port


# ---------------------------------------------------------------------------- server


class Server:
    """A `crosskv serve` child: its stderr is drained by a thread so it never blocks on a
    full pipe, and the listening line is picked out of it."""

    NOTABLE = ("panic", "error", "warn", "fatal", "abort")

    def __init__(self, binary: str, serve_args: list[str], log_path: str | None):
        self.cmd = [binary, "serve", "--port", "0", *serve_args]
        self.tail: collections.deque[str] = collections.deque(maxlen=60)
        # Line -> count, in first-seen order: one message repeated per request must not
        # crowd out the rest.
        self.notable: dict[str, int] = {}
        self.listening: str | None = None
        self.listening_event = threading.Event()
        self.log_file = open(log_path, "w") if log_path else None
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None
        self.shutdown_s: float | None = None

    def start(self) -> None:
        log("starting " + " ".join(self.cmd))
        self.proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # Its own process group: a Ctrl-C at the terminal must reach the soak only,
            # so the soak decides how the server is stopped.
            start_new_session=True,
        )
        threading.Thread(target=self._drain, name="server-stderr", daemon=True).start()

    def _drain(self) -> None:
        assert self.proc and self.proc.stderr
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if self.log_file:
                self.log_file.write(line + "\n")
                self.log_file.flush()
            # tracing colours its output even into a pipe; the summary wants plain text.
            line = ANSI.sub("", line)
            self.tail.append(line)
            if self.listening is None and line.startswith("crosskv: listening on "):
                self.listening = line.split("listening on ", 1)[1].strip()
                self.listening_event.set()
            low = line.lower()
            if any(w in low for w in self.NOTABLE) and (line in self.notable or len(self.notable) < 50):
                self.notable[line] = self.notable.get(line, 0) + 1
        self.listening_event.set()  # EOF: the server died before listening, wake the waiter

    def wait_listening(self, timeout: float) -> tuple[str, int]:
        if not self.listening_event.wait(timeout) or self.listening is None:
            raise RuntimeError("the server did not print its listening line" + self._died())
        host, port = parse_url(self.listening)
        # An unspecified bind address (--host 0.0.0.0 / ::) is reachable on loopback;
        # that is where the soak goes, never anywhere else.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        return host, port

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _died(self) -> str:
        if self.proc is not None and self.proc.poll() is not None:
            return f" (it exited with {self.proc.returncode})"
        return ""

    def stop(self) -> None:
        """SIGTERM, then up to 60 s for a clean exit; SIGKILL after that."""
        if self.proc is None:
            return
        if self.proc.poll() is not None:
            self.exit_code = self.proc.returncode
            return
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.proc.wait(SHUTDOWN_TIMEOUT_S)
            self.shutdown_s = time.monotonic() - t0
        except subprocess.TimeoutExpired:
            log(f"server still running {SHUTDOWN_TIMEOUT_S:.0f} s after SIGTERM; killing it")
            self.proc.kill()
            self.proc.wait()
            self.exit_code = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_health(t: Target, timeout: float, server: Server | None) -> float:
    """Polls GET /health until 200 (it is 503 while the model loads)."""
    t0 = time.monotonic()
    last_note = t0
    last = "no answer yet"
    while True:
        if server is not None and not server.alive():
            raise RuntimeError("the server exited while loading" + server._died())
        try:
            status, body = t.get_json("/health", timeout=5.0)
            if status == 200:
                return time.monotonic() - t0
            last = f"HTTP {status}"
        except (OSError, http.client.HTTPException) as e:
            last = type(e).__name__
        now = time.monotonic()
        if now - t0 > timeout:
            raise RuntimeError(f"/health not 200 after {timeout:.0f} s (last: {last})")
        if now - last_note >= 30:
            log(f"waiting for /health: {now - t0:.0f} s, last {last}")
            last_note = now
        time.sleep(1.0)


# ---------------------------------------------------------------------------- prompts


class Prompts:
    """Prompt text of varied length. Half the prompts open with one of a few shared
    preambles so that the prefix cache gets hits; a few are long enough (thousands of
    tokens) to need chunked prefill."""

    BUCKETS = [((3, 12), 35), ((30, 90), 30), ((150, 400), 25), ((800, 1600), 10)]

    def __init__(self, seed: int):
        rng = random.Random(seed ^ 0x5EED)
        self.preambles = [self.words(rng, n) for n in (40, 120, 250, 400)]

    @staticmethod
    def words(rng: random.Random, n: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    def make(self, rng: random.Random, max_words: int) -> str:
        (lo, hi), = rng.choices([b for b, _ in self.BUCKETS], [w for _, w in self.BUCKETS])
        n = rng.randint(lo, hi)
        parts = []
        if rng.random() < 0.5:
            fitting = [p for p in self.preambles if p.count(" ") + 1 + 3 <= max_words]
            if fitting:
                pre = rng.choice(fitting)
                parts.append(pre)
                n = max(3, min(n, max_words - (pre.count(" ") + 1)))
        n = max(1, min(n, max_words))
        parts.append(self.words(rng, n))
        return " ".join(parts)


# ---------------------------------------------------------------------------- stats


class KindStats:
    def __init__(self) -> None:
        self.sent = 0
        self.ok = 0
        self.cancelled = 0
        self.http: collections.Counter[int] = collections.Counter()
        self.exceptions: collections.Counter[str] = collections.Counter()
        self.tokens = 0
        self.latencies: list[float] = []
        self.examples: list[str] = []

    def to_json(self) -> dict:
        lat = sorted(self.latencies)
        return {
            "sent": self.sent,
            "ok": self.ok,
            "cancelled": self.cancelled,
            "http_errors": {str(k): v for k, v in sorted(self.http.items())},
            "exceptions": dict(self.exceptions),
            "completion_tokens": self.tokens,
            "latency_s": {
                "p50": pct(lat, 0.5),
                "p95": pct(lat, 0.95),
                "max": lat[-1] if lat else None,
            },
            "error_examples": self.examples,
        }


def pct(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    return sorted_vals[min(len(sorted_vals) - 1, int(q * len(sorted_vals)))]


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.kinds = {k: KindStats() for k in KINDS}
        self.extras_ok: collections.Counter[str] = collections.Counter()

    def record(self, kind: str, extra: str | None, outcome: str, latency: float, tokens: int = 0,
               status: int | None = None, exc: BaseException | None = None) -> None:
        with self.lock:
            s = self.kinds[kind]
            s.sent += 1
            if outcome in ("ok", "cancelled"):
                s.latencies.append(latency)
                s.tokens += tokens
                if outcome == "ok":
                    s.ok += 1
                    if extra:
                        self.extras_ok[extra] += 1
                else:
                    s.cancelled += 1
                return
            if outcome == "http":
                assert status is not None
                s.http[status] += 1
                detail = str(exc)
            else:
                s.exceptions[type(exc).__name__] += 1
                detail = f"{type(exc).__name__}: {exc}"
            if len(s.examples) < 5 and detail not in s.examples:
                s.examples.append(f"{detail}" + (f" [extra {extra}]" if extra else ""))


# ---------------------------------------------------------------------------- clients


class Ctx:
    def __init__(self, target: Target, model: str, max_model_len: int, prompts: Prompts, timeout: float):
        self.target = target
        self.model = model
        self.max_model_len = max_model_len
        self.prompts = prompts
        self.timeout = timeout


def build(kind: str, extra: str | None, rng: random.Random, ctx: Ctx) -> tuple[str, dict, bool]:
    chat = kind.startswith("chat") or (kind == "cancel" and rng.random() < 0.5)
    # Cancels ask for many tokens so that the client really leaves mid-stream.
    max_tokens = rng.randint(64, 160) if kind == "cancel" else rng.randint(8, 48)
    # Two tokens a word is well above these words' rate; 64 leaves room for the chat
    # template, so no request trips the context-length check.
    max_words = max(3, (ctx.max_model_len - max_tokens - 64) // 2)
    prompt = ctx.prompts.make(rng, max_words)
    body: dict = {"model": ctx.model, "max_tokens": max_tokens}
    if rng.random() < 0.5:
        body["temperature"] = 0
    else:
        body["temperature"] = 0.8
        body["seed"] = rng.randrange(1 << 31)
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    stream = kind != "completion" and kind != "chat"
    if stream:
        body["stream"] = True
        if kind != "cancel":
            body["stream_options"] = {"include_usage": True}
    if extra == "n2":
        body["n"] = 2
    elif extra == "stop":
        body["stop"] = ["\n"]
    elif extra == "logprobs":
        if chat:
            body["logprobs"] = True
            body["top_logprobs"] = 2
        else:
            body["logprobs"] = 2
    return ("/v1/chat/completions" if chat else "/v1/completions"), body, chat


def check_response(obj: object, chat: bool, n: int, extra: str | None) -> int:
    if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
        raise ProtocolError(f"no choices list in {str(obj)[:200]}")
    choices = obj["choices"]
    if len(choices) != n:
        raise ProtocolError(f"{len(choices)} choices, asked for {n}")
    for c in choices:
        if chat:
            msg = c.get("message")
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
                raise ProtocolError(f"chat choice without message content: {str(c)[:200]}")
            if extra == "logprobs" and not isinstance((c.get("logprobs") or {}).get("content"), list):
                raise ProtocolError("logprobs asked for but choice has no logprobs.content")
        else:
            if not isinstance(c.get("text"), str):
                raise ProtocolError(f"completion choice without text: {str(c)[:200]}")
            if extra == "logprobs" and not isinstance(c.get("logprobs"), dict):
                raise ProtocolError("logprobs asked for but choice has no logprobs")
    usage = obj.get("usage")
    if not isinstance(usage, dict) or not isinstance(usage.get("completion_tokens"), int):
        raise ProtocolError(f"no usage.completion_tokens in {str(usage)[:200]}")
    return usage["completion_tokens"]


def sse_events(resp: http.client.HTTPResponse, deadline: float):
    """Yields each `data:` payload of an SSE body, as text."""
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("stream ran past the request timeout")
        line = resp.readline()
        if not line:
            return
        line = line.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            data = line[5:]
            if data.startswith(b" "):
                data = data[1:]
            yield data.decode("utf-8")


def one_request(kind: str, extra: str | None, rng: random.Random, ctx: Ctx) -> tuple[str, int]:
    """Runs one request; returns (outcome, completion tokens). HTTP errors and broken
    responses raise."""
    path, body, chat = build(kind, extra, rng, ctx)
    n = body.get("n", 1)
    deadline = time.monotonic() + ctx.timeout
    conn = ctx.target.conn(ctx.timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers=ctx.target.headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raw = resp.read().decode("utf-8", "replace")
            raise HttpError(resp.status, raw)
        if not body.get("stream"):
            raw = resp.read()
            try:
                obj = json.loads(raw)
            except ValueError as e:
                raise ProtocolError(f"bad JSON: {e}: {raw[:200]!r}") from None
            return "ok", check_response(obj, chat, n, extra)

        stop_after = rng.randint(1, 3) if kind == "cancel" else None
        chunks = 0
        tokens = None
        done = False
        for data in sse_events(resp, deadline):
            if data == "[DONE]":
                done = True
                break
            try:
                obj = json.loads(data)
            except ValueError as e:
                raise ProtocolError(f"bad SSE JSON: {e}: {data[:200]!r}") from None
            if not isinstance(obj, dict):
                raise ProtocolError(f"SSE event is not an object: {data[:200]!r}")
            if "error" in obj:
                raise ProtocolError(f"error event in stream: {data[:300]}")
            if isinstance(obj.get("usage"), dict):
                tokens = obj["usage"].get("completion_tokens")
            chunks += 1
            if stop_after is not None and chunks >= stop_after:
                # The point of a cancel: drop the socket mid-stream; the server must
                # notice, abort the sequence and free its blocks (checked at the end).
                try:
                    if conn.sock is not None:
                        conn.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                resp.close()
                conn.close()
                return "cancelled", 0
        if not done:
            raise ProtocolError(f"stream ended after {chunks} events without data: [DONE]")
        if kind != "cancel" and not isinstance(tokens, int):
            raise ProtocolError("stream_options.include_usage set but no usage chunk came")
        return "ok", tokens or 0
    finally:
        conn.close()


def client_loop(i: int, seed: int, ctx: Ctx, stats: Stats, stop: threading.Event) -> None:
    rng = random.Random(seed * 1_000_003 + i)
    while not stop.is_set():
        kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
        extra = rng.choice(EXTRAS) if kind != "cancel" and rng.random() < EXTRA_PROB else None
        t0 = time.monotonic()
        try:
            outcome, tokens = one_request(kind, extra, rng, ctx)
            stats.record(kind, extra, outcome, time.monotonic() - t0, tokens)
        except HttpError as e:
            stats.record(kind, extra, "http", time.monotonic() - t0, status=e.status, exc=e)
            # Back off on 429 (and anything else) rather than spinning on a full queue.
            time.sleep(rng.uniform(0.2, 0.5))
        except Exception as e:  # noqa: BLE001 -- every other failure is counted, by type
            stats.record(kind, extra, "exception", time.monotonic() - t0, exc=e)
            time.sleep(0.2)


# ---------------------------------------------------------------------------- sampler


def read_rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def read_kv(t: Target) -> dict | None:
    try:
        status, obj = t.get_json("/v1/kv", timeout=10.0)
    except (OSError, http.client.HTTPException):
        return None
    if status != 200 or not isinstance(obj, dict):
        return None
    return obj


def sampler_loop(t: Target, pid: int, every: float, t0: float, samples: list, stop: threading.Event,
                 server: Server | None, died: threading.Event, client_stop: threading.Event) -> None:
    while True:
        rss = read_rss_kb(pid)
        kv = read_kv(t)
        samples.append({
            "t": round(time.monotonic() - t0, 2),
            "wall": time.time(),
            "rss_kb": rss,
            "blocks_used": kv.get("blocks_used") if kv else None,
            "num_running": kv.get("num_running") if kv else None,
            "num_waiting": kv.get("num_waiting") if kv else None,
        })
        gone = rss is None if server is None else not server.alive()
        if gone:
            # No point hammering a dead server for the rest of the run.
            died.set()
            client_stop.set()
            return
        if stop.wait(every):
            return


def wait_idle(t: Target, timeout: float) -> dict:
    t0 = time.monotonic()
    last = None
    while True:
        kv = read_kv(t)
        if kv is not None:
            last = {k: kv.get(k) for k in ("blocks_used", "num_running", "num_waiting")}
            if all(v == 0 for v in last.values()):
                return {"idle": True, "after_s": round(time.monotonic() - t0, 2), "last": last}
        if time.monotonic() - t0 > timeout:
            return {"idle": False, "after_s": round(time.monotonic() - t0, 2), "last": last}
        time.sleep(0.5)


# ---------------------------------------------------------------------------- analysis


def rss_analysis(samples: list, duration: float, warmup_fraction: float, max_growth_mb: float) -> dict:
    all_rss = [s["rss_kb"] for s in samples if s["rss_kb"] is not None]
    cut = warmup_fraction * duration
    post = [s["rss_kb"] for s in samples if s["rss_kb"] is not None and s["t"] >= cut]
    out: dict = {"samples": len(all_rss), "post_warmup_samples": len(post), "warmup_until_s": round(cut, 1)}
    if all_rss:
        out.update(min_mb=min(all_rss) / 1024, median_mb=statistics.median(all_rss) / 1024,
                   max_mb=max(all_rss) / 1024)
    if len(post) < 3:
        out.update(checked=False, ok=True, note="fewer than 3 post-warm-up samples; RSS growth not judged")
        return out
    k = max(1, len(post) // 3)
    first, last = statistics.median(post[:k]) / 1024, statistics.median(post[-k:]) / 1024
    growth = last - first
    out.update(checked=True, first_third_median_mb=first, last_third_median_mb=last, growth_mb=growth,
               limit_mb=max_growth_mb, ok=growth <= max_growth_mb)
    return out


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def summarize(report: dict) -> str:
    L: list[str] = []
    cfg = report["config"]
    L.append("soak summary")
    L.append(f"  server {report.get('server_url')} pid {report.get('pid')} model {report.get('model')!r} "
             f"max_model_len {report.get('max_model_len')} ({cfg['mode']} mode"
             + (f", /health 200 after {report['health_wait_s']:.1f} s" if report.get("health_wait_s") is not None else "")
             + ")")
    kv0 = report.get("kv_capacity") or {}
    if kv0:
        L.append(f"  KV arena: {kv0.get('num_blocks')} blocks x {kv0.get('block_bytes')} B "
                 f"= {fmt((kv0.get('num_blocks') or 0) * (kv0.get('block_bytes') or 0) / 2**20)} MB, "
                 f"{kv0.get('capacity_tokens')} tokens")
    L.append(f"  clients {cfg['clients']}, planned {cfg['minutes'] * 60:.0f} s, client phase "
             f"{report['client_phase_s']:.1f} s, seed {cfg['seed']}")
    L.append("")
    hdr = f"  {'kind':<18}{'sent':>6}{'ok':>6}{'cancel':>7}{'429':>5}{'http err':>9}{'exc':>5}{'tokens':>8}{'p50 s':>7}{'p95 s':>7}{'max s':>7}"
    L.append(hdr)
    tot = collections.Counter()
    for k in KINDS:
        s = report["kinds"][k]
        h429 = s["http_errors"].get("429", 0)
        herr = sum(v for c, v in s["http_errors"].items() if c != "429")
        exc = sum(s["exceptions"].values())
        lat = s["latency_s"]
        L.append(f"  {k:<18}{s['sent']:>6}{s['ok']:>6}{s['cancelled']:>7}{h429:>5}{herr:>9}{exc:>5}"
                 f"{s['completion_tokens']:>8}{fmt(lat['p50'], '.2f'):>7}{fmt(lat['p95'], '.2f'):>7}{fmt(lat['max'], '.2f'):>7}")
        tot.update(sent=s["sent"], ok=s["ok"], cancel=s["cancelled"], h429=h429, herr=herr, exc=exc,
                   tokens=s["completion_tokens"])
    L.append(f"  {'total':<18}{tot['sent']:>6}{tot['ok']:>6}{tot['cancel']:>7}{tot['h429']:>5}{tot['herr']:>9}"
             f"{tot['exc']:>5}{tot['tokens']:>8}")
    L.append("  extras among ok requests: " + ", ".join(f"{e}={report['extras_ok'].get(e, 0)}" for e in EXTRAS))
    for k in KINDS:
        s = report["kinds"][k]
        # 429 is allowed and already in the table; only the rest gets spelled out.
        for c, v in s["http_errors"].items():
            if c != "429":
                L.append(f"  ! {k}: HTTP {c} x{v}")
        for c, v in s["exceptions"].items():
            L.append(f"  ! {k}: {c} x{v}")
        for ex in s["error_examples"]:
            if not ex.startswith("HTTP 429"):
                L.append(f"      e.g. {ex[:300]}")
    tp = report["throughput"]
    L.append("")
    L.append(f"  throughput: {tp['completed_req_per_s']:.2f} completed req/s, {tp['generated_tok_per_s']:.1f} "
             f"generated tok/s ({tp['completed']} requests, {tp['tokens']} tokens in {report['client_phase_s']:.1f} s)")
    r = report["rss"]
    L.append("")
    L.append(f"  RSS: {r['samples']} samples, {r['post_warmup_samples']} after warm-up (t >= {r['warmup_until_s']} s)")
    if r.get("samples"):
        L.append(f"    min / median / max: {fmt(r.get('min_mb'))} / {fmt(r.get('median_mb'))} / {fmt(r.get('max_mb'))} MB")
    if r.get("checked"):
        L.append(f"    first third median {r['first_third_median_mb']:.1f} MB, last third median "
                 f"{r['last_third_median_mb']:.1f} MB, growth {r['growth_mb']:+.1f} MB "
                 f"(limit {r['limit_mb']:.0f} MB): {'ok' if r['ok'] else 'TOO MUCH'}")
    else:
        L.append(f"    {r.get('note')}")
    samples = report["samples"]
    step = max(1, len(samples) // 30)  # the JSON keeps them all; the table stays readable
    L.append(f"    {'t s':>7}{'rss MB':>9}{'blocks':>8}{'running':>9}{'waiting':>9}")
    for s in samples[::step]:
        L.append(f"    {s['t']:>7.1f}{fmt(s['rss_kb'] and s['rss_kb'] / 1024):>9}{fmt(s['blocks_used'], 'd'):>8}"
                 f"{fmt(s['num_running'], 'd'):>9}{fmt(s['num_waiting'], 'd'):>9}")
    pk = report["kv_peaks"]
    L.append(f"    peaks: blocks_used {pk['blocks_used']}, num_running {pk['num_running']}, num_waiting {pk['num_waiting']}")
    idle = report["idle"]
    L.append("")
    if idle is None:
        L.append("  idle check: skipped")
    else:
        L.append(f"  idle check: {'idle' if idle['idle'] else 'NOT idle'} after {idle['after_s']} s, last /v1/kv {idle['last']}"
                 + (f", RSS then {report['rss_after_idle_kb'] / 1024:.1f} MB" if report.get("rss_after_idle_kb") else ""))
    sd = report.get("shutdown")
    if sd:
        L.append(f"  shutdown: SIGTERM -> exit code {sd['exit_code']}"
                 + (f" after {sd['seconds']:.1f} s" if sd["seconds"] is not None else " (killed)"))
    if report.get("server_notable"):
        L.append("  server stderr lines worth a look:")
        L.extend(f"    {x[:300]}" + (f"  (x{c})" if c > 1 else "") for x, c in list(report["server_notable"].items())[:20])
    return "\n".join(L)


# ---------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--url", help="a running server, http://127.0.0.1:PORT (loopback only)")
    mode.add_argument("--binary", help="a crosskv binary to start as `PATH serve --port 0 ...`")
    ap.add_argument("--pid", type=int, help="the running server's PID (with --url; for RSS)")
    ap.add_argument("--serve-arg", action="append", default=[],
                    help="passed through to `serve` (repeatable; use --serve-arg=--flag for flags)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-seconds", type=float, default=5.0)
    ap.add_argument("--warmup-fraction", type=float, default=0.25)
    ap.add_argument("--max-rss-growth-mb", type=float, default=64.0)
    ap.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
    ap.add_argument("--api-key", default=os.environ.get("CROSSKV_API_KEY"),
                    help="Bearer key, if the server has --api-key (default: $CROSSKV_API_KEY)")
    ap.add_argument("--server-log", help="with --binary: write the server's stderr here")
    ap.add_argument("--json", help="also write the report as JSON to this file")
    a = ap.parse_args(argv)
    if a.url and a.pid is None:
        ap.error("--url needs --pid (the RSS check reads /proc/PID/status)")
    if a.binary and a.pid is not None:
        ap.error("--pid is only for --url; with --binary the soak knows its child")
    if a.url and (a.serve_arg or a.server_log):
        ap.error("--serve-arg and --server-log need --binary")
    if a.clients < 1 or a.minutes <= 0 or a.sample_seconds <= 0 or a.request_timeout <= 0:
        ap.error("--clients, --minutes, --sample-seconds and --request-timeout must be positive")
    if not 0 <= a.warmup_fraction < 1:
        ap.error("--warmup-fraction must be in [0, 1)")
    return a


def run(a: argparse.Namespace) -> int:
    failures: list[str] = []
    server: Server | None = None
    report: dict = {"config": {"mode": "binary" if a.binary else "url", "clients": a.clients, "minutes": a.minutes,
                               "seed": a.seed, "sample_seconds": a.sample_seconds,
                               "warmup_fraction": a.warmup_fraction, "max_rss_growth_mb": a.max_rss_growth_mb,
                               "request_timeout_s": a.request_timeout, "serve_args": a.serve_arg,
                               "binary": a.binary}}
    if a.url:
        host, port = parse_url(a.url)
        target = Target(host, port, a.api_key, a.request_timeout)
        pid = a.pid
        if read_rss_kb(pid) is None:
            raise UsageError(f"--pid {pid}: cannot read /proc/{pid}/status")
        owns = pid_owns_port(pid, port)
        if owns is False:
            raise UsageError(f"--pid {pid} does not hold the listening socket of port {port}; "
                             f"give the server's own PID (e.g. `ss -ltnp 'sport = :{port}'`)")
        if owns is None:
            log(f"cannot confirm that pid {pid} is the server on port {port}; trusting --pid")
    else:
        if not (os.path.isfile(a.binary) and os.access(a.binary, os.X_OK)):
            raise UsageError(f"--binary {a.binary}: not an executable file")
        server = Server(a.binary, a.serve_arg, a.server_log)
        server.start()
        pid = server.proc.pid

    stats = Stats()
    samples: list = []
    startup_error: str | None = None
    client_stop = threading.Event()
    try:
        if server is not None:
            host, port = server.wait_listening(60.0)
            target = Target(host, port, a.api_key, a.request_timeout)
        report["server_url"], report["pid"] = target.url, pid
        log(f"server {target.url} pid {pid}; waiting for /health")
        report["health_wait_s"] = wait_health(target, STARTUP_TIMEOUT_S, server)
        log(f"/health 200 after {report['health_wait_s']:.1f} s")

        status, models = target.get_json("/v1/models")
        if status != 200 or not isinstance(models, dict) or not models.get("data"):
            raise RuntimeError(f"GET /v1/models: HTTP {status}: {str(models)[:200]}")
        card = models["data"][0]
        report["model"] = card["id"]
        report["max_model_len"] = int(card.get("max_model_len") or 2048)
        kv0 = read_kv(target) or {}
        report["kv_capacity"] = {k: kv0.get(k) for k in ("num_blocks", "block_size", "block_bytes", "capacity_tokens")}

        ctx = Ctx(target, report["model"], report["max_model_len"], Prompts(a.seed), a.request_timeout)
        duration = a.minutes * 60.0
        log(f"soaking: {a.clients} clients for {duration:.0f} s")
        sampler_stop = threading.Event()
        died = threading.Event()
        t0 = time.monotonic()
        sampler = threading.Thread(target=sampler_loop, daemon=True, name="sampler",
                                   args=(target, pid, a.sample_seconds, t0, samples, sampler_stop, server, died,
                                         client_stop))
        sampler.start()
        clients = [threading.Thread(target=client_loop, args=(i, a.seed, ctx, stats, client_stop),
                                    daemon=True, name=f"client-{i}") for i in range(a.clients)]
        for c in clients:
            c.start()
        client_stop.wait(duration)
        client_stop.set()
        log("time is up; letting in-flight requests finish")
        # A client is at most one request past the deadline, and each request is bounded.
        join_deadline = time.monotonic() + a.request_timeout + 30
        for c in clients:
            c.join(max(0.0, join_deadline - time.monotonic()))
        stuck = sum(c.is_alive() for c in clients)
        client_phase = time.monotonic() - t0
        sampler_stop.set()
        sampler.join(30)
        report["client_phase_s"] = client_phase
        if stuck:
            failures.append(f"{stuck} client thread(s) stuck past the request timeout")
        if died.is_set():
            failures.append("the server died during the soak")

        report["idle"] = None if died.is_set() else wait_idle(target, IDLE_TIMEOUT_S)
        if report["idle"] is not None:
            report["rss_after_idle_kb"] = read_rss_kb(pid)
            if not report["idle"]["idle"]:
                failures.append(f"server not idle {IDLE_TIMEOUT_S:.0f} s after the clients stopped "
                                f"(leaked blocks / stuck requests: {report['idle']['last']})")
        report["rss"] = rss_analysis(samples, client_phase, a.warmup_fraction, a.max_rss_growth_mb)
        if not report["rss"]["ok"]:
            r = report["rss"]
            failures.append(f"RSS grew {r['growth_mb']:.1f} MB after warm-up (limit {r['limit_mb']:.0f} MB)")
    except KeyboardInterrupt:
        client_stop.set()
        failures.append("interrupted")
        report.setdefault("client_phase_s", 0.0)
    except (RuntimeError, OSError, http.client.HTTPException) as e:
        # Startup (or a bookkeeping call) failed: no soak ran, but the server still has
        # to be stopped and its last words shown.
        client_stop.set()
        startup_error = f"{type(e).__name__}: {e}"
    finally:
        if server is not None:
            if server.alive():
                log("stopping the server with SIGTERM")
            was_alive = server.alive()
            server.stop()
            report["shutdown"] = {"exit_code": server.exit_code, "seconds": server.shutdown_s,
                                  "signalled": was_alive}
            report["server_notable"] = server.notable
            report["server_stderr_tail"] = list(server.tail)

    if startup_error is not None:
        if server is not None and server.tail:
            print("server stderr (last lines):")
            print("\n".join(f"  {x}" for x in server.tail))
        if a.json:
            report["failures"] = [startup_error]
            report["pass"] = False
            with open(a.json, "w") as f:
                json.dump(report, f, indent=2)
        print(f"soak: FAIL {startup_error}", flush=True)
        return 1

    if server is not None:
        sd = report["shutdown"]
        if sd["exit_code"] != 0:
            failures.append(f"server exit code {sd['exit_code']} after SIGTERM" if sd["signalled"]
                            else f"server exited on its own with code {sd['exit_code']}")

    # Failures from what the clients saw.
    for k, s in stats.kinds.items():
        for code, v in s.http.items():
            if code >= 500:
                failures.append(f"{k}: HTTP {code} x{v}")
            elif code != 429:
                failures.append(f"{k}: unexpected HTTP {code} x{v}")
        for name, v in s.exceptions.items():
            failures.append(f"{k}: {name} x{v}")

    report["kinds"] = {k: s.to_json() for k, s in stats.kinds.items()}
    report["extras_ok"] = dict(stats.extras_ok)
    completed = sum(s.ok for s in stats.kinds.values())
    tokens = sum(s.tokens for s in stats.kinds.values())
    phase = report.get("client_phase_s") or 0.0
    report["throughput"] = {"completed": completed, "tokens": tokens,
                            "completed_req_per_s": completed / phase if phase else 0.0,
                            "generated_tok_per_s": tokens / phase if phase else 0.0}
    report["samples"] = samples
    report.setdefault("rss", rss_analysis(samples, phase, a.warmup_fraction, a.max_rss_growth_mb))
    report.setdefault("idle", None)
    report["kv_peaks"] = {k: max((s[k] for s in samples if s[k] is not None), default=None)
                          for k in ("blocks_used", "num_running", "num_waiting")}
    if completed == 0 and "interrupted" not in failures:
        failures.append("no request completed")
    report["failures"] = failures
    report["pass"] = not failures

    print(summarize(report), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    if failures:
        print("soak: FAIL " + "; ".join(failures), flush=True)
        return 1
    r = report["rss"]
    growth = f"{r['growth_mb']:+.1f} MB" if r.get("checked") else "not judged"
    print(f"soak: PASS {completed} requests ({sum(s.cancelled for s in stats.kinds.values())} cancels), "
          f"{report['throughput']['completed_req_per_s']:.2f} req/s, "
          f"{report['throughput']['generated_tok_per_s']:.1f} tok/s, RSS growth {growth}, blocks freed", flush=True)
    return 0


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    try:
        return run(a)
    except UsageError as e:
        print(f"soak: FAIL usage: {e}", flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
