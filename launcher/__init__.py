"""launcher: start vLLM-style engine-core ranks across hosts without Ray.

Every rank gets an allowlisted copy of the head's environment with the
worker-specific variables dropped, and binds its NIXL side channel on its own
host's address.

    import launcher
    plan = launcher.plan_job(launcher.hostfile.read("hostfile"))
    result = launcher.launch(plan, check=launcher.CheckOptions())
    assert result.ok, result.failure.message

A user command instead of the built-in engine core::

    options = launcher.LaunchOptions(command=("vllm", "serve", "M", "--headless", ...), per_host=True)
"""

__version__ = "0.1.0"

from . import hostfile  # noqa: E402
from .api import launch, plan_job  # noqa: E402
from .check import CheckOptions  # noqa: E402
from .plan import Host, LaunchOptions, LaunchPlan, RankSpec, Readiness  # noqa: E402
from .supervisor import LaunchResult, RankResult  # noqa: E402

__all__ = [
    "CheckOptions", "Host", "LaunchOptions", "LaunchPlan", "LaunchResult", "RankResult", "RankSpec", "Readiness",
    "hostfile", "launch", "plan_job",
]
