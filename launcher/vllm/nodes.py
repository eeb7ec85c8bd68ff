"""``--vllm-nodes``: one vLLM instance whose tensor or pipeline parallel workers span hosts, without Ray.

vLLM 0.32 runs model parallelism across nodes with its multiprocessing
executor when every node runs the same ``vllm serve`` with ``--nnodes N
--node-rank R --master-addr HEAD --master-port PORT``, and every node but the
first ``--headless`` (docs/serving/parallelism_scaling.md; its own checks
are in ``EngineArgs.create_engine_config``: ``--nnodes`` needs the ``mp``
data-parallel backend, must divide the world size ``DP x PP x TP x PCP``,
and ``--node-rank`` must lie in ``[0, N)``). Here each host of the hostfile
is one node, in hostfile order; the first host's address is ``{head_ip}``
and the master port is ``{rpc_port}`` (checked free on the first host
before anything starts). What vLLM would refuse is refused before launch,
with vLLM's reason. Pure: argv tuples in, out.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..command import CommandError
from .flags import HEADLESS, flag_value, given, is_vllm_serve, refuse_written

NNODES = ("--nnodes", "-n")
NODE_RANK = ("--node-rank", "-r")
MASTER_ADDR = ("--master-addr",)
MASTER_PORT = ("--master-port",)
DP_BACKEND = ("--data-parallel-backend", "-dpb")
# The sizes whose product is vLLM's world size (EngineArgs: DP x PP x TP x PCP), each 1 unless given.
SIZES = (
    ("--data-parallel-size", "-dp"),
    ("--pipeline-parallel-size", "-pp"),
    ("--tensor-parallel-size", "-tp"),
    ("--prefill-context-parallel-size", "-pcp"),
)


def nodes_commands(command: Sequence[str], nodes: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the first node's command, every other node's) for one instance over ``nodes`` hosts."""
    command = tuple(command)
    if not is_vllm_serve(command):
        raise CommandError(f"--vllm-nodes writes the multi-node flags of 'vllm serve'; the command is {' '.join(command[:2])!r} ...")
    written = (
        (NNODES, "launcher counts the hosts"),
        (NODE_RANK, "launcher gives each host its node rank"),
        (MASTER_ADDR, "launcher gives the first host's own address"),
        (HEADLESS, "launcher makes every host but the first headless"),
    )
    refuse_written(command, written, "--vllm-nodes")
    backend = flag_value(command, DP_BACKEND)
    if nodes > 1 and backend not in (None, "mp"):
        raise CommandError(
            f"vLLM refuses it: `--nnodes {nodes}` requires `--data-parallel-backend mp`; got `--data-parallel-backend {backend}`"
        )
    world = world_size(command)
    if world is not None and world % nodes:
        raise CommandError(
            f"vLLM refuses it: `--nnodes {nodes}` must evenly divide the total world size ({world}); give as many hosts "
            f"as divide it, or adjust --tensor-parallel-size / --pipeline-parallel-size / --data-parallel-size"
        )
    port = () if given(command, MASTER_PORT) else ("--master-port", "{rpc_port}")
    common = (*command, "--nnodes", str(nodes), "--node-rank", "{host_index}", "--master-addr", "{head_ip}", *port)
    return common, (*common, "--headless")


def world_size(command: Sequence[str]) -> int | None:
    """DP x PP x TP x PCP as the command gives them (1 each by default); None when one is not a number."""
    total = 1
    for names in SIZES:
        text = flag_value(command, names)
        if text is None:
            continue
        if not text.isdigit() or int(text) < 1:
            return None
        total *= int(text)
    return total
