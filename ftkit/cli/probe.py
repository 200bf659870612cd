"""``ftkit probe``: this machine's GPUs, CPU, RAM and bitsandbytes, and which model sizes fit."""

from __future__ import annotations

import click

from ftkit.cli.output import print_json, print_table

EPILOG = """\b
Examples:
  $ ftkit probe                           # this machine, and what fits on its GPU
  $ ftkit probe --gpu-mem 24GB            # what fits on a 24 GiB card (no such card needed)
  $ ftkit probe --gpu-mem 80G --seq 2048  # an 80 GiB card, 2048-token sequences
  $ ftkit probe --json | jq '.fits.methods.qlora'

\b
--gpu-mem takes 24, 24GB, 24GiB or 80G; a plain number is GiB, and GB/G
are read as GiB, as GPU makers mean them. Without it, fits are computed
for the total memory of the largest GPU found.

\b
--json keys (stable):
  cuda             list of GPUs: index, name, total_bytes, free_bytes,
                   compute_capability ("8.6"), bf16 (true from 8.0 on)
  nvml             available, driver_version, cuda_driver_version, error
                   (why no GPU was listed)
  torch            null unless a GPU was found (torch is imported only
                   then): version, cuda_version, cuda_available,
                   device_count, bf16, error
  mps              likely_available, note (torch is never imported for it)
  cpu              logical_cores, usable_cores, machine, ram_total_bytes,
                   ram_available_bytes
  bitsandbytes     version (null: not installed), four_bit_cuda_ok (null:
                   not tested), four_bit_cpu_capable, error, note
  fits             null without a GPU or --gpu-mem; else gpu_mem_bytes,
                   seq, source ("probed" | "--gpu-mem"), methods: for each
                   of full, lora, qlora: largest_model (null: none fits),
                   largest_batch, batch1_bytes
  recommendations  list of {command, why}: what to run next
"""


@click.command(epilog=EPILOG)
@click.option("--gpu-mem", metavar="SIZE",
              help="Compute what fits for this much GPU memory, e.g. 24GB (default: the probed GPU's).")
@click.option("--seq", type=click.IntRange(min=1), default=512, show_default=True,
              help="Sequence length (tokens) the fits are computed at.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (keys below) instead of text.")
def probe(gpu_mem: str | None, seq: int, as_json: bool) -> None:
    """Show this machine's hardware for fine-tuning, and the largest model and batch each method fits.

    Lists CUDA GPUs (name, total and free memory, compute capability, bf16), Apple MPS, CPU cores
    and RAM, and whether bitsandbytes runs 4-bit here. Then, for full fine-tuning, LoRA and QLoRA:
    the largest model size (0.5B ... 72B) that fits the GPU memory at batch 1, and the largest batch
    for it, from the same estimator as `ftkit estimate`. Without an NVIDIA GPU it imports no torch.
    """
    from ftkit.probe import parse_memory_size, probe_machine

    gpu_bytes = parse_memory_size(gpu_mem, "--gpu-mem") if gpu_mem is not None else None
    report = probe_machine(gpu_mem=gpu_bytes, seq=seq)
    if as_json:
        print_json(report)
        return
    _print_report(report)


def _print_report(report: dict) -> None:
    from ftkit.probe import format_gib

    nvml, torch_report = report["nvml"], report["torch"]
    if report["cuda"]:
        click.secho(f"CUDA GPUs (driver {nvml['driver_version']}, CUDA {nvml['cuda_driver_version']})", bold=True)
        rows = [(d["index"], d["name"], format_gib(d["total_bytes"]), format_gib(d["free_bytes"]),
                 d["compute_capability"], "yes" if d["bf16"] else "no") for d in report["cuda"]]
        print_table(("INDEX", "NAME", "TOTAL", "FREE", "COMPUTE", "BF16"), rows)
        if torch_report["cuda_available"]:
            click.echo(f"torch {torch_report['version']} (CUDA {torch_report['cuda_version']}) uses "
                       f"{torch_report['device_count']} GPU(s); bf16: {'yes' if torch_report['bf16'] else 'no'}")
        else:
            click.secho(f"torch cannot use them: {torch_report['error']}", fg="yellow")
    else:
        click.secho("CUDA GPUs", bold=True)
        click.echo(f"  no CUDA GPU: {nvml['error']}")
    click.secho("Apple MPS", bold=True)
    click.echo(f"  {report['mps']['note']}")
    cpu = report["cpu"]
    click.secho("CPU", bold=True)
    click.echo(f"  {cpu['logical_cores']} cores ({cpu['usable_cores']} usable by this process), {cpu['machine']}")
    click.echo(f"  RAM {format_gib(cpu['ram_total_bytes'])} total, {format_gib(cpu['ram_available_bytes'])} available")
    bnb = report["bitsandbytes"]
    click.secho("bitsandbytes", bold=True)
    click.echo(f"  {bnb['version'] + ': ' if bnb['version'] else ''}{bnb['note']}")
    if bnb["error"]:
        click.echo(f"  error: {bnb['error']}")
    click.echo()
    _print_fits(report["fits"])
    click.echo()
    click.secho("Next", bold=True)
    steps = report["recommendations"]
    width = max(len(step["command"]) for step in steps)
    for step in steps:
        click.echo(f"  $ {step['command']:<{width}}  # {step['why']}")


def _print_fits(fits: dict | None) -> None:
    from ftkit.probe import format_gib

    if fits is None:
        click.secho("What fits", bold=True)
        click.echo("  No CUDA GPU, so no GPU memory to fit models into. Small models still train on the CPU,")
        click.echo("  slowly; pass --gpu-mem to see what fits on a card you don't have (e.g. --gpu-mem 24GB).")
        return
    origin = "given by --gpu-mem" if fits["source"] == "--gpu-mem" else "the largest GPU's total"
    click.secho(f"What fits in {format_gib(fits['gpu_mem_bytes'])} ({origin}) at --seq {fits['seq']}", bold=True)
    rows = []
    for method, fit in fits["methods"].items():
        if fit["largest_model"] is None:
            rows.append((method, "none", "-", "-"))
        else:
            rows.append((method, fit["largest_model"], fit["largest_batch"], format_gib(fit["batch1_bytes"])))
    print_table(("METHOD", "LARGEST MODEL", "LARGEST BATCH", "BATCH 1 NEEDS"), rows)
    click.echo("Estimates, not measurements; `ftkit estimate --model SIZE --gpu-mem SIZE` breaks one down.")
