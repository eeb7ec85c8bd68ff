"""--gpus-per-rank and placeholders in environment values: each rank its own devices and its own NIC."""

import os
import re

import pytest

from conftest import failed_line, launch_hosts, run_launcher, write_hostfile
from launcher import hostfile, plan
from launcher.gpus import Devices, GpuError, discover, parse_device_list, slice_for
from launcher.plan import Host, LaunchOptions, PlanError
from launcher.results import Phase

NO_SMI = lambda: None


def test_a_hosts_devices_come_from_the_first_source_that_names_them():
    smi = lambda: ("0", "1")
    assert discover("4", {"CUDA_VISIBLE_DEVICES": "7"}, smi) == Devices(("0", "1", "2", "3"), "gpus= in the hostfile")
    assert discover(None, {"CUDA_VISIBLE_DEVICES": "4,5"}, smi).ids == ("4", "5")
    assert discover(None, {"CUDA_VISIBLE_DEVICES": "4,5", "SLURM_STEP_ID": "0"}, smi).source == "Slurm's CUDA_VISIBLE_DEVICES for this step"
    assert discover(None, {"CUDA_VISIBLE_DEVICES": "NoDevFiles", "SLURM_JOB_GPUS": "2,3"}, smi) == Devices(
        ("2", "3"), "SLURM_JOB_GPUS (Slurm)"
    )
    assert discover(None, {}, smi) == Devices(("0", "1"), "nvidia-smi -L")
    assert discover(None, {}, NO_SMI) is None


def test_each_rank_gets_its_own_slice_and_a_per_host_process_gets_its_ranks_slices():
    eight = Devices(tuple(map(str, range(8))), "x")
    assert [slice_for(eight, host="h", local_rank=r, served=1, per_rank=2, slots=4) for r in range(4)] == ["0,1", "2,3", "4,5", "6,7"]
    assert slice_for(eight, host="h", local_rank=0, served=4, per_rank=2, slots=4) == "0,1,2,3,4,5,6,7"
    uuids = Devices(("GPU-a", "GPU-b"), "x")
    assert slice_for(uuids, host="h", local_rank=1, served=1, per_rank=1, slots=2) == "GPU-b"


def test_too_few_devices_or_none_found_is_an_error_naming_the_host_and_the_source():
    with pytest.raises(GpuError, match=r"needs 6 GPUs on h1, which has 4 \(nvidia-smi -L: 0,1,2,3\); lower --gpus-per-rank"):
        slice_for(Devices(("0", "1", "2", "3"), "nvidia-smi -L"), host="h1", local_rank=0, served=1, per_rank=3, slots=2)
    with pytest.raises(GpuError, match=r"no GPUs found on h2 .*set gpus=N or gpus=0,1,... for this host"):
        slice_for(None, host="h2", local_rank=0, served=1, per_rank=1, slots=1)


def test_device_lists_are_refused_with_the_line_when_malformed():
    assert parse_device_list("3") == ("0", "1", "2") and parse_device_list("0,2") == ("0", "2")
    with pytest.raises(ValueError, match="listed twice"):
        parse_device_list("0,0")
    with pytest.raises(hostfile.HostfileError, match=r"hf:1: .*gpus='0;rm': '0;rm' is not a device index or id; give a count"):
        hostfile.parse("a gpus=0;rm\n", source="hf")


@pytest.mark.parametrize("text", ["99999999999999", "1025", "0," * 5000 + "1", "9" * 5000])
def test_a_device_count_from_input_is_bounded_before_anything_is_built_for_it(text):
    """gpus=99999999999999 once built that many strings: 24 GB, until the kernel's OOM killer stepped in."""
    with pytest.raises(ValueError, match=r"devices is more than a host has \(at most 1024\)"):
        parse_device_list(text)
    with pytest.raises(GpuError, match=r"more than a host has"):
        discover(None, {"CUDA_VISIBLE_DEVICES": text}, lambda: None)
    assert len(parse_device_list("1024")) == 1024


def test_the_plan_refuses_a_host_with_too_few_listed_gpus_and_fills_env_placeholders_per_rank():
    with pytest.raises(PlanError, match=r"needs 4 GPUs on a \(hf:1\), which has 2"):
        plan.build([Host("a", slots=2, gpus="2", origin="hf:1")], LaunchOptions(gpus_per_rank=2), {}, "j")
    host = Host("a", slots=2, env=(("UCX_NET_DEVICES", "mlx5_{local_rank}:1"),))
    built = plan.build([host], LaunchOptions(env=(("TAG", "job-{job_id}-r{rank}"),)), {}, "j")
    assert [(r.env["UCX_NET_DEVICES"], r.env["TAG"]) for r in built.ranks] == [("mlx5_0:1", "job-j-r0"), ("mlx5_1:1", "job-j-r1")]
    literal = plan.build([Host("a", env=(("X", "{{rank}}"),))], LaunchOptions(), {}, "j")
    assert literal.ranks[0].env["X"] == "{rank}"


@pytest.mark.parametrize("value, name", [("{host_ip}", "host_ip"), ("a{nope}", "nope")])
def test_an_env_placeholder_only_the_host_knows_or_none_knows_is_a_plan_error(value, name):
    with pytest.raises(PlanError) as info:
        plan.build([Host("a", origin="hf:3")], LaunchOptions(env=(("X", value),)), {}, "j")
    message = str(info.value)
    assert message.startswith(f"X={value!r} (--env) uses {{{name}}}, which an environment value cannot take: only {{rank}}")
    assert message.endswith(f"write {{{{{name}}}}} for a literal")


SHOW = ["--", "sh", "-c", 'echo "gpus=$CUDA_VISIBLE_DEVICES nic=$UCX_NET_DEVICES"']


def shown(stdout: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^\[r(\d+) \S+\] (gpus=.*)$", stdout, re.M)}


@pytest.mark.e2e
def test_loopback_ranks_get_their_hostfile_slices_and_nics(tmp_path, no_leaks, port_base):
    hf = write_hostfile(tmp_path, "localhost slots=2 gpus=0,1,4,5 env:UCX_NET_DEVICES=mlx5_{local_rank}:1")
    done = run_launcher("run", "-H", hf, "--port-base", str(port_base), "--gpus-per-rank", "2", "--to-completion", *SHOW)
    assert done.returncode == 0, done.stderr
    assert shown(done.stdout) == {0: "gpus=0,1 nic=mlx5_0:1", 1: "gpus=4,5 nic=mlx5_1:1"}


@pytest.mark.e2e
def test_loopback_devices_found_by_nvidia_smi_and_oversubscription_stops_before_any_rank(tmp_path, no_leaks, port_base):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text(
        '#!/bin/sh\n[ "$1" = -L ] || exit 9\necho "GPU 0: Fake (UUID: GPU-a)"\necho "GPU 1: Fake (UUID: GPU-b)"\n'
    )
    (fake / "nvidia-smi").chmod(0o755)
    env = {"PATH": f"{fake}:{os.environ['PATH']}"}
    hf = write_hostfile(tmp_path, "localhost slots=2")
    done = run_launcher("run", "-H", hf, "--port-base", str(port_base), "--gpus-per-rank", "1", "--to-completion", *SHOW, env=env)
    assert done.returncode == 0, done.stderr
    assert shown(done.stdout) == {0: "gpus=0 nic=", 1: "gpus=1 nic="}
    marker = tmp_path / "started"
    over = run_launcher(
        "run", "-H", hf, "--port-base", str(port_base), "--gpus-per-rank", "2", "--to-completion", "--", "touch", str(marker), env=env
    )
    assert over.returncode == 4, over.stderr
    assert failed_line(over.stderr) == (
        "rank 0 on localhost cannot become ready: --gpus-per-rank 2 x 2 ranks needs 4 GPUs on localhost, which has 2 "
        "(nvidia-smi -L: 0,1); lower --gpus-per-rank or slots= for this host"
    )
    assert not marker.exists()  # no rank ran


def test_ssh_hosts_slice_their_own_devices(hosts):
    # h1 lists its devices in the hostfile; h2's come from its own CUDA_VISIBLE_DEVICES (an env: for that host).
    text = "h1 slots=2 gpus=GPU-a,GPU-b,GPU-c,GPU-d env:UCX_NET_DEVICES=mlx5_{local_rank}:1\nh2 env:CUDA_VISIBLE_DEVICES=6,7\n"
    out = os.path.join(hosts.workdir, "gpus-{rank}")
    shell = f'echo "$CUDA_VISIBLE_DEVICES $UCX_NET_DEVICES" > {out}'
    result = launch_hosts(text, hosts, LaunchOptions(command=("sh", "-c", shell), to_completion=True, gpus_per_rank=2))
    assert result.ok, result.failure
    seen = [open(out.replace("{rank}", str(r))).read().split() for r in range(3)]
    assert seen == [["GPU-a,GPU-b", "mlx5_0:1"], ["GPU-c,GPU-d", "mlx5_1:1"], ["6,7"]]
    assert all(r.state == Phase.EXITED and r.exit_code == 0 for r in result.ranks)
