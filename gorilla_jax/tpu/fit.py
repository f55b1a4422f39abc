"""Fit check: compile the real train step ahead of time for a TPU topology, on any machine.

``fit_check(cfg, "v5e:4x4")`` builds compile-only TPU devices with libtpu
(``jax.experimental.topologies``), makes the training mesh over them exactly as the trainer
does (``sharding.make_mesh``), gives every input of the step (parameters, optimizer state, step,
RNG and the batch) its real sharding (``train.loop.state_shardings``), lowers and compiles
``jax.jit(train_step)`` with the trainer's in/out shardings and donation, and reads:

- **memory**: the TPU compiler plans every buffer of the program (arguments, temporaries,
  outputs, donated inputs reused as outputs) and refuses a program whose peak exceeds the HBM
  it allows one program (15.75 GiB on v5e; ``chips.ChipSpec.usable_hbm_bytes``). Per chip we
  report that peak (``memory_analysis().peak_memory_in_bytes``) against that limit, with the
  breakdown (arguments, temporaries, outputs, code). When the compiler refuses the program,
  the report carries the compiler's own figures from its RESOURCE_EXHAUSTED message and
  ``fits`` is false; the breakdown is then estimated from the input shardings.
- **FLOPs**, three ways:
  ``flops_per_step``: the project's model formula (train/metrics.py; used for MFU);
  ``program_flops_per_step``: every matrix product of the traced step counted from its jaxpr,
  with scanned loops (layers, micro-batches) multiplied by their length and the
  rematerialised forward included: the work the chips actually do;
  ``xla_cost_analysis_flops``: ``compiled.cost_analysis()['flops']`` summed over chips. XLA
  counts each loop body once (the layer scan, the micro-batch scan and the windowed collective
  matmul loops the TPU compiler makes), so it undercounts; it is shown, not used.
- **time**: a compute-bound roofline. The predicted step time is the program FLOPs at
  ``efficiency`` times the chips' peak bf16 FLOP/s; the predicted MFU is the model FLOPs over
  that (with full remat about 0.82 * efficiency for LLaMA-7B: the recomputed forward is work
  the formula does not count, and the attention's causal query blocks skip some it does).
  Communication, vector work and input are assumed hidden behind
  the matrix units: a real run is slower, and the default efficiency of 1.0 gives the fastest
  the step can go. Tokens/s, chip-hours and cost for ``train.steps`` steps follow from it.

Multi-slice (``num_slices > 1``): libtpu describes all slices; the mesh's ``dcn_data`` axis
spans them (``mesh.dcn_data`` is set to the number of slices). The roofline leaves out the
gradient all-reduce between slices over the data-centre network.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Optional

from gorilla_jax.config import Config
from gorilla_jax.errors import GorillaError
from gorilla_jax.tpu.chips import GIB, Topology, parse_topology

LIBTPU_HINT = ("the fit check needs libtpu (compile-only TPU devices): install it with "
               "`pip install -e .[tpu]` or `pip install libtpu==0.0.42.1` (the version "
               "jax[tpu]==0.10.2 pins)")


class FitError(GorillaError):
    """The fit check cannot run (libtpu missing, a mesh that does not match the topology...)."""


@dataclass
class FitReport:
    topology: str
    accelerator_type: str
    device_kind: str
    num_chips: int
    num_slices: int
    mesh: dict
    global_batch_size: int
    micro_batches: int
    seq_len: int
    steps: int
    hbm_bytes_per_chip: int  # the compiler's peak for one chip
    hbm_capacity_bytes: int  # what the compiler allows one program on this chip
    hbm_nominal_bytes: int
    fits: bool
    compiled: bool  # False: the compiler refused the program (out of HBM)
    argument_bytes: int  # params, optimizer state, batch (per chip)
    temp_bytes: Optional[int]
    output_bytes: Optional[int]
    alias_bytes: Optional[int]
    generated_code_bytes: Optional[int]
    allocation_sum_bytes: Optional[int]  # arguments + outputs - aliased + temporaries + code
    flops_per_step: float
    program_flops_per_step: float
    xla_cost_analysis_flops: float
    peak_flops_per_chip: float
    efficiency: float
    predicted_step_seconds: float
    predicted_mfu: float
    tokens_per_step: int
    tokens_per_second: float
    chip_hours: float
    price_per_chip_hour: float
    predicted_cost_usd: float
    compile_seconds: float
    assumption: str
    suggestions: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- libtpu devices


def _quiet_libtpu_env(accelerator_type: str) -> None:
    """Environment for a compile-only libtpu in this process.

    ``ALLOW_MULTIPLE_LIBTPU_LOAD``: other processes on the machine (any jax process once
    libtpu is installed) may hold libtpu's lock file; compile-only devices claim no hardware.
    Off a TPU VM, libtpu otherwise probes the GCE metadata server and prints warnings about the
    unknown worker; the worker variables below answer it locally.
    """
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    on_tpu_vm = os.path.exists("/dev/accel0") or os.path.isdir("/dev/vfio/devices")
    if not on_tpu_vm:
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type)


def topology_devices(topology: Topology) -> list:
    """Compile-only jax devices for ``topology`` (all slices)."""
    _quiet_libtpu_env(topology.accelerator_type)
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise FitError(LIBTPU_HINT) from None
    from jax.experimental import topologies

    kwargs = {}
    if topology.chip.chip_config_name:
        kwargs["chip_config_name"] = topology.chip.chip_config_name
    if topology.num_slices > 1:
        kwargs["num_slices"] = topology.num_slices
    try:
        desc = topologies.get_topology_desc(topology_name=topology.name, platform="tpu", **kwargs)
    except Exception as e:  # libtpu reports bad shapes as JaxRuntimeError
        raise FitError(f"libtpu cannot build topology {topology.describe()}: {e}") from None
    devices = list(desc.devices)
    if len(devices) != topology.num_chips:
        raise FitError(f"libtpu gave {len(devices)} devices for {topology.describe()}, expected "
                       f"{topology.num_chips}")
    return devices


# ----------------------------------------------------------------------------- FLOPs of a jaxpr


def _sub_jaxprs(value):
    from jax.extend import core as jcore

    if isinstance(value, jcore.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jcore.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def matmul_flops(jaxpr) -> float:
    """FLOPs of every ``dot_general`` in ``jaxpr`` (2 per multiply-add), loops unrolled.

    ``scan`` bodies count ``length`` times; of ``cond`` branches the most expensive counts;
    every other nested jaxpr (pjit, remat, custom_vjp, ...) counts once. A ``while`` with an
    unknown trip count counts its body once.
    """
    if hasattr(jaxpr, "jaxpr") and not hasattr(jaxpr, "eqns"):
        jaxpr = jaxpr.jaxpr
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            out_shape = eqn.outvars[0].aval.shape
            total += 2.0 * math.prod(out_shape) * math.prod(lhs_shape[d] for d in lhs_contract)
        elif name == "scan":
            total += eqn.params["length"] * matmul_flops(eqn.params["jaxpr"])
        elif name == "cond":
            total += max((matmul_flops(b) for b in eqn.params["branches"]), default=0.0)
        else:
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    total += matmul_flops(sub)
    return total


# ----------------------------------------------------------------------------- the check


def _memory(ma) -> dict:
    get = lambda k: int(getattr(ma, k, 0) or 0)  # noqa: E731
    parts = {
        "argument_bytes": get("argument_size_in_bytes"),
        "output_bytes": get("output_size_in_bytes"),
        "alias_bytes": get("alias_size_in_bytes"),
        "temp_bytes": get("temp_size_in_bytes"),
        "generated_code_bytes": get("generated_code_size_in_bytes"),
    }
    parts["allocation_sum_bytes"] = (parts["argument_bytes"] + parts["output_bytes"]
                                     - parts["alias_bytes"] + parts["temp_bytes"]
                                     + parts["generated_code_bytes"])
    parts["hbm_bytes_per_chip"] = get("peak_memory_in_bytes") or parts["allocation_sum_bytes"]
    return parts


_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
_OOM = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                  r"\(([\d.]+)([KMGT]?)\)")


def parse_out_of_memory(message: str) -> Optional[tuple[int, int]]:
    """(required, available) bytes from the TPU compiler's RESOURCE_EXHAUSTED message."""
    m = _OOM.search(message)
    if not m:
        return None
    return (int(float(m.group(1)) * _UNITS[m.group(2)]),
            int(float(m.group(3)) * _UNITS[m.group(4)]))


def per_chip_bytes(abstract_tree) -> int:
    """Bytes one chip holds of a tree of sharded ``ShapeDtypeStruct`` (the fullest shard)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shape = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def _with_slices(cfg: Config, topology: Topology) -> Config:
    """The config with ``mesh.dcn_data`` matching the slice count."""
    if topology.num_slices == 1:
        if cfg.mesh.dcn_data != 1:
            raise FitError(f"mesh.dcn_data={cfg.mesh.dcn_data} needs that many slices: pass "
                           f"--num-slices {cfg.mesh.dcn_data}")
        return cfg
    if cfg.mesh.dcn_data not in (1, topology.num_slices):
        raise FitError(f"mesh.dcn_data={cfg.mesh.dcn_data} does not match --num-slices "
                       f"{topology.num_slices}")
    mesh = dataclasses.replace(cfg.mesh, dcn_data=topology.num_slices)
    return dataclasses.replace(cfg, mesh=mesh)


@dataclass
class CompiledStep:
    compiled: object  # jax.stages.Compiled, or None when the compiler ran out of HBM
    error: Optional[str]  # the compiler's RESOURCE_EXHAUSTED message
    jaxpr: object
    mesh: object
    inputs: tuple  # (state, batch) as sharded ShapeDtypeStructs
    seconds: float


def compile_train_step(cfg: Config, devices) -> CompiledStep:
    """Lower and compile the trainer's jit step for ``devices`` (compile-only TPU devices)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from gorilla_jax import sharding
    from gorilla_jax.model import LlamaForCausalLM, abstract_params
    from gorilla_jax.train.loop import state_shardings
    from gorilla_jax.train.optimizer import make_in_place_update, make_optimizer, make_schedule
    from gorilla_jax.train.step import BATCH_KEYS, TrainState, make_train_step

    t = cfg.train
    try:
        mesh = sharding.make_mesh(cfg.mesh, devices=devices)
    except GorillaError as e:
        raise FitError(f"{e} (the topology has {len(devices)} chips)") from None
    abstract = abstract_params(cfg.model)
    optimizer = make_optimizer(cfg.optimizer, t.steps, abstract)
    schedule = make_schedule(cfg.optimizer, t.steps)
    state_sh = state_shardings(cfg, mesh, optimizer, abstract)
    shape = (t.global_batch_size, cfg.data.seq_len)
    batch_sh = sharding.batch_sharding(mesh, 2, shape=shape)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_state = jax.eval_shape(
        lambda: TrainState(step=jnp.int32(0), params=abstract, opt_state=optimizer.init(abstract),
                           rng=jax.random.PRNGKey(0)))
    state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract_state, state_sh)
    batch_in = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=batch_sh) for k in BATCH_KEYS}
    step_fn = make_train_step(LlamaForCausalLM(cfg.model).apply, optimizer,
                              micro_batches=t.micro_batches, z_loss=cfg.optimizer.z_loss,
                              schedule=schedule,  # the in-place update applies on CPU only
                              in_place_update=make_in_place_update(cfg.optimizer, t.steps,
                                                                   abstract))
    t0 = time.perf_counter()
    with sharding.activate(mesh):
        jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_sh),
                         out_shardings=(state_sh, replicated), donate_argnums=(0,))
        traced = jitted.trace(state_in, batch_in)
        lowered = traced.lower()
        try:
            compiled, error = lowered.compile(), None
        except Exception as e:  # jax.errors.JaxRuntimeError
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            compiled, error = None, str(e)
    return CompiledStep(compiled, error, traced.jaxpr, mesh, (state_in, batch_in),
                        time.perf_counter() - t0)


def fit_check(cfg: Config, topology: str | Topology, *, num_slices: int = 1,
              efficiency: float = 1.0, price_per_chip_hour: Optional[float] = None) -> FitReport:
    """Compile ``cfg``'s train step for ``topology`` and predict memory, speed and cost."""
    from gorilla_jax.train.metrics import flops_per_step

    if not 0.0 < efficiency <= 1.0:
        raise FitError(f"--efficiency must be in (0, 1]; got {efficiency}")
    topo = topology if isinstance(topology, Topology) else parse_topology(topology, num_slices)
    cfg = _with_slices(cfg, topo)
    devices = topology_devices(topo)
    step = compile_train_step(cfg, devices)
    capacity = topo.chip.usable_hbm_bytes
    if step.compiled is not None:
        mem = _memory(step.compiled.memory_analysis())
        cost = step.compiled.cost_analysis()
        if isinstance(cost, (list, tuple)):
            cost = cost[0] if cost else {}
        xla_flops = float((cost or {}).get("flops", 0.0)) * topo.num_chips
    else:
        parsed = parse_out_of_memory(step.error)
        if parsed is None:
            raise FitError(f"the TPU compiler failed: {step.error[:500]}")
        required, capacity = parsed
        args = per_chip_bytes(step.inputs)
        mem = {"argument_bytes": args, "temp_bytes": max(required - args, 0), "output_bytes": None,
               "alias_bytes": None, "generated_code_bytes": None, "allocation_sum_bytes": None,
               "hbm_bytes_per_chip": required}
        xla_flops = 0.0
    jaxpr, mesh = step.jaxpr, step.mesh

    t = cfg.train
    model_flops = flops_per_step(cfg.model, t.global_batch_size, cfg.data.seq_len)
    program_flops = matmul_flops(jaxpr)
    peak = topo.chip.peak_bf16_flops
    step_seconds = program_flops / (topo.num_chips * peak * efficiency)
    mfu = model_flops / (step_seconds * topo.num_chips * peak)
    tokens = t.global_batch_size * cfg.data.seq_len
    chip_hours = t.steps * step_seconds * topo.num_chips / 3600.0
    price = topo.chip.price_per_chip_hour if price_per_chip_hour is None else price_per_chip_hour
    assumption = (f"compute-bound roofline: the step's matrix products ({program_flops:.3e} "
                  f"FLOPs, remat recompute included) run at {efficiency:.0%} of "
                  f"{peak / 1e12:.0f} TFLOP/s bf16 per chip; communication, vector work and "
                  f"input assumed hidden. A real run is slower.")
    report = FitReport(
        topology=topo.name, accelerator_type=topo.accelerator_type,
        device_kind=devices[0].device_kind, num_chips=topo.num_chips,
        num_slices=topo.num_slices, mesh={k: int(v) for k, v in mesh.shape.items()},
        global_batch_size=t.global_batch_size, micro_batches=t.micro_batches,
        seq_len=cfg.data.seq_len, steps=t.steps,
        hbm_capacity_bytes=capacity, hbm_nominal_bytes=topo.chip.hbm_bytes,
        fits=step.compiled is not None and mem["hbm_bytes_per_chip"] <= capacity,
        compiled=step.compiled is not None,
        flops_per_step=model_flops, program_flops_per_step=program_flops,
        xla_cost_analysis_flops=xla_flops, peak_flops_per_chip=peak, efficiency=efficiency,
        predicted_step_seconds=step_seconds, predicted_mfu=mfu, tokens_per_step=tokens,
        tokens_per_second=tokens / step_seconds, chip_hours=chip_hours,
        price_per_chip_hour=price, predicted_cost_usd=chip_hours * price,
        compile_seconds=step.seconds, assumption=assumption, **mem)
    report.suggestions = suggestions(cfg, report)
    return report


def suggestions(cfg: Config, r: FitReport) -> list[str]:
    """What to change when the step does not fit (empty when it fits with room to spare)."""
    over = r.hbm_bytes_per_chip - r.hbm_capacity_bytes
    if over <= 0 and r.hbm_bytes_per_chip <= 0.95 * r.hbm_capacity_bytes:
        return []
    out = []
    state = r.argument_bytes
    if over > 0:
        rest = r.hbm_bytes_per_chip - state
        out.append(f"needs {over / GIB:.2f} GiB more than the {r.hbm_capacity_bytes / GIB:.2f} "
                   f"GiB the compiler allows per chip ({r.hbm_bytes_per_chip / GIB:.2f} GiB, "
                   f"{r.hbm_bytes_per_chip / r.hbm_capacity_bytes:.0%}): training state (params, "
                   f"optimizer, batch) {state / GIB:.2f} GiB, the rest (activations, gradients, "
                   f"gathered weights) {rest / GIB:.2f} GiB per chip")
    else:
        out.append(f"fits with under 5% to spare ({r.hbm_bytes_per_chip / GIB:.2f} of "
                   f"{r.hbm_capacity_bytes / GIB:.2f} GiB): a larger batch or sequence will not")
    def worth(saving: float) -> bool:  # a change that recovers a tenth of the excess or more
        return over <= 0 or saving >= 0.1 * over

    m = r.mesh
    replicas = m.get("data", 1)  # parameters are replicated over the plain data axis only
    if replicas > 1 and worth(state * (1 - 1 / replicas)):
        out.append(f"shard parameters and optimizer state over all chips: mesh.fsdp=-1 "
                   f"mesh.data=1 (state now replicated {replicas}x: about "
                   f"{state / GIB:.2f} -> {state / replicas / GIB:.2f} GiB per chip)")
    if cfg.model.remat == "none":
        out.append("rematerialise each layer: model.remat=full (keeps one activation per layer)")
    elif cfg.model.remat != "full":
        out.append("remat more: model.remat=full instead of " + cfg.model.remat)
    if not cfg.model.scan_layers:
        out.append("model.scan_layers=true: XLA schedules one layer body instead of N unrolled "
                   "layers whose buffers may overlap")
    per_micro = r.global_batch_size // max(r.micro_batches, 1)
    data_par = m.get("dcn_data", 1) * m.get("data", 1) * m.get("fsdp", 1)
    if per_micro >= 2 * data_par:  # below one sequence per chip the batch stops sharding
        nxt = r.micro_batches * 2
        if r.global_batch_size % nxt == 0:
            out.append(f"smaller micro-batches: train.micro_batches={nxt} (activations scale with "
                       f"the micro-batch, {per_micro} -> {per_micro // 2} sequences)")
    if cfg.model.param_dtype == "float32" and worth(state / 2):
        out.append("model.param_dtype=bfloat16 halves parameter and optimizer bytes (updates "
                   "lose precision)")
    if over > 0:
        need = math.ceil(r.hbm_bytes_per_chip * r.num_chips / (0.9 * r.hbm_capacity_bytes))
        out.append(f"or more chips: state and activations spread over about {need} chips of "
                   f"this kind would fit at 90% of capacity")
    return out


def format_report(r: FitReport) -> str:
    def gib(b):
        return f"{b / GIB:.2f} GiB" if b >= GIB // 10 else f"{b / 2 ** 20:.1f} MiB"

    mesh = " x ".join(f"{k}={v}" for k, v in r.mesh.items() if v > 1) or "1 device"
    verdict = "FITS" if r.fits else "DOES NOT FIT"
    lines = [
        f"topology        {r.topology} ({r.accelerator_type}, {r.device_kind}), {r.num_chips} "
        f"chips" + (f" in {r.num_slices} slices" if r.num_slices > 1 else ""),
        f"mesh            {mesh}",
        f"batch           {r.global_batch_size} x {r.seq_len} tokens, {r.micro_batches} "
        f"micro-batch(es), {r.steps} steps",
        f"compile         {r.compile_seconds:.1f} s"
        + ("" if r.compiled else " (refused by the TPU compiler: out of HBM)"),
        "",
        f"HBM per chip    {gib(r.hbm_bytes_per_chip)} of {gib(r.hbm_capacity_bytes)} usable "
        f"({r.hbm_bytes_per_chip / r.hbm_capacity_bytes:.0%}; {gib(r.hbm_nominal_bytes)} "
        f"nominal) -> {verdict}",
        f"  arguments     {gib(r.argument_bytes)} (params, optimizer state, batch)",
    ]
    if r.compiled:
        lines += [
            f"  temporaries   {gib(r.temp_bytes)} allocated",
            f"  outputs       {gib(r.output_bytes)} ({gib(r.alias_bytes)} reuse donated inputs)",
            f"  code          {gib(r.generated_code_bytes)}",
            f"  (peak is the compiler's live-buffer plan; arguments + temporaries + outputs - "
            f"donated + code add up to {gib(r.allocation_sum_bytes)})",
        ]
    else:
        lines.append(f"  the rest      {gib(r.temp_bytes)} (the compiler's total minus arguments)")
    xla = (f"{r.xla_cost_analysis_flops:.4e} XLA cost analysis (loop bodies counted once: an "
           f"undercount)" if r.compiled else "(no XLA cost analysis: not compiled)")
    lines += [
        "",
        f"FLOPs/step      {r.flops_per_step:.4e} model formula (used for MFU)",
        f"                {r.program_flops_per_step:.4e} executed matmuls (jaxpr, remat included)",
        f"                {xla}",
        f"step time       {r.predicted_step_seconds:.4g} s predicted, MFU "
        f"{r.predicted_mfu:.1%}, {r.tokens_per_second:,.0f} tokens/s",
        f"full run        {r.steps} steps = {r.chip_hours:,.3g} chip-hours = "
        f"${r.predicted_cost_usd:,.2f} at ${r.price_per_chip_hour:.2f}/chip-hour (prediction)",
        f"assumption      {r.assumption}",
    ]
    if r.suggestions:
        lines.append("")
        lines.append("suggestions:")
        lines += [f"  - {s}" for s in r.suggestions]
    return "\n".join(lines)
