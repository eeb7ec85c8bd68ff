import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launcher import envpolicy, plan
from launcher.envpolicy import EnvPolicy, rank_environment
from launcher.plan import Host, LaunchOptions

SEED_LEAK = {
    "VLLM_NIXL_SIDE_CHANNEL_HOST": "198.18.0.1",
    "VLLM_HOST_IP": "198.18.0.1",
    "CUDA_VISIBLE_DEVICES": "0,1",
    "VLLM_DP_RANK": "3",
    "LOCAL_RANK": "1",
}


def test_worker_specific_names_are_dropped_even_when_the_user_includes_them():
    head = {**SEED_LEAK, "VLLM_USE_V1": "1", "NCCL_DEBUG": "INFO", "PATH": "/bin", "MY_APP_X": "1"}
    report = rank_environment(head, EnvPolicy(include=("VLLM_*", "CUDA_VISIBLE_DEVICES", "LOCAL_RANK", "MY_APP_")))
    assert set(report.dropped) == set(SEED_LEAK)
    assert not set(SEED_LEAK) & set(report.env)
    assert report.copied == {"VLLM_USE_V1": "prefix VLLM_", "NCCL_DEBUG": "prefix NCCL_", "MY_APP_X": "--env-include MY_APP_"}
    assert "PATH" not in report.env


def test_explicit_values_win_in_order_and_a_host_value_is_never_overwritten():
    head = {"VLLM_X": "head", "HF_HOME": "/h"}
    report = rank_environment(
        head,
        EnvPolicy(),
        job_env=[("VLLM_X", "job"), ("A", "1")],
        host_env=[("VLLM_X", "host"), ("VLLM_NIXL_SIDE_CHANNEL_HOST", "10.0.0.5")],
        rank_env={"VLLM_X": "rank", "LAUNCHER_RANK": "0"},
    )
    assert report.env["VLLM_X"] == "host"
    assert report.env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "10.0.0.5"  # honoured: explicit for this host
    assert report.set == {"VLLM_X": "host option", "A": "--env", "VLLM_NIXL_SIDE_CHANNEL_HOST": "host option", "LAUNCHER_RANK": "launcher"}
    assert report.copied == {"HF_HOME": "prefix HF_"}


def test_the_heads_own_launcher_variables_never_travel():
    report = rank_environment({"LAUNCHER_RANK": "7"}, EnvPolicy(include=("*",)))
    assert "LAUNCHER_RANK" not in report.env


@pytest.mark.parametrize("name", ["HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "db_password", "S3_ACCESS_KEY_ID"])
def test_secret_looking_values_are_masked(name):
    assert envpolicy.masked(name, "hunter2") == "****"


def test_plain_values_are_shown():
    assert envpolicy.masked("NCCL_DEBUG", "INFO") == "INFO"


def test_agent_strips_worker_specific_names_from_the_hosts_own_environment_but_its_devices():
    stripped = envpolicy.host_environment({**SEED_LEAK, "PATH": "/bin", "LAUNCHER_X": "1", "ROCR_VISIBLE_DEVICES": ""})
    # The device list is the host's own (Slurm's per-node choice, the host's profile): transports never carry the head's.
    assert stripped == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1"}


names = st.sampled_from(
    ["VLLM_USE_V1", "VLLM_ATTENTION_BACKEND", "NCCL_DEBUG", "HF_HOME", "UCX_TLS", "PYTHONHASHSEED", "VLLM_PORT", "OTHER"]
    + sorted(envpolicy.WORKER_SPECIFIC)
)


@settings(max_examples=200, deadline=None)
@given(
    head=st.dictionaries(names, st.text(max_size=5), max_size=12),
    slots=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    job_env=st.lists(st.tuples(st.sampled_from(["VLLM_USE_V1", "NCCL_X", "FOO"]), st.text(max_size=3)), max_size=3),
)
def test_ranks_of_one_job_differ_only_in_what_vllm_leaves_out_of_its_compile_hash(head, slots, job_env):
    hosts = [Host(name=f"h{i}", slots=n) for i, n in enumerate(slots)]
    launch = plan.build(hosts, LaunchOptions(env=tuple(job_env)), head, job_id="j")
    envs = []
    for rank in launch.ranks:
        env = dict(rank.env)
        # What each engine core sets at start-up (setdefault of its own address).
        env.setdefault("VLLM_NIXL_SIDE_CHANNEL_HOST", f"198.18.0.{11 + rank.host_index}")
        env.setdefault("VLLM_HOST_IP", f"198.18.0.{11 + rank.host_index}")
        envs.append(env)
    allowed = envpolicy.COMPILE_HASH_IGNORED
    for env in envs[1:]:
        differing = {k for k in set(env) | set(envs[0]) if env.get(k) != envs[0].get(k)}
        assert all(k in allowed or k.startswith("LAUNCHER_") for k in differing), differing
    assert {r.env["VLLM_NIXL_SIDE_CHANNEL_PORT"] for r in launch.ranks} == {str(launch.port_base)}


def test_every_layer_names_the_code_that_applies_it_and_plan_prints_them_in_order():
    import importlib

    from launcher.output import console as report

    for layer in envpolicy.LAYERS:
        module, _, path = layer.applied_by.partition(".")
        target = importlib.import_module(f"launcher.{module}")
        for part in path.split("."):
            target = getattr(target, part)  # an AttributeError here: the table names code that is gone
        assert callable(target), layer
    shown = report.render_plan(plan.build([plan.Host("localhost")], plan.LaunchOptions(), {}, "j"), python="python3")
    assert " < ".join(f"{layer.name} ({layer.applied_by})" for layer in envpolicy.LAYERS) in shown
