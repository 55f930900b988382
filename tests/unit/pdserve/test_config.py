import pytest
from pydantic import ValidationError

from pdserve.config import ServeConfig, config_from_dict, load_config


def test_embedded_default_is_local_cpu_smollm2():
    config = load_config()
    assert config.ray.address is None
    assert config.engine.model == "smollm2-135m-instruct"
    assert config.workers.mode == "disaggregated"
    assert (config.workers.prefill_instances, config.workers.decode_instances) == (1, 1)
    assert config.transfer.transport == "tcp" and config.transfer.layerwise


def test_empty_file_means_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert load_config(path) == ServeConfig()


def test_sections_override_defaults():
    config = config_from_dict({"workers": {"instances": 3}, "router": {"policy": "round_robin"}})
    assert config.workers.instances == 3
    assert config.router.policy == "round_robin"
    assert config.engine == ServeConfig().engine


def test_unknown_keys_are_errors():
    with pytest.raises(ValidationError, match="instancez"):
        config_from_dict({"workers": {"instancez": 3}})
    with pytest.raises(ValidationError, match="routr"):
        config_from_dict({"routr": {}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"workers": {"instances": 0}}, "workers.instances must be >= 1"),
        ({"router": {"policy": "fastest"}}, "router.policy must be one of"),
        ({"router": {"prefill_policy": "projected_kv"}}, "router.prefill_policy must be one of"),
        ({"router": {"predictor": "/nonexistent/head.pt"}}, "router.predictor: no head file at"),
        ({"router": {"hold_queue": -1}}, "router.hold_queue must be >= 0"),
        ({"engine": {"kv_cache_gib": 0}}, "engine.kv_cache_gib must be > 0"),
        ({"engine": {"dtype": "int4"}}, "engine.dtype must be"),
        ({"engine": {"max_model_len": 4096, "max_num_batched_tokens": 2048}}, "must be >= engine.max_model_len"),
    ],
)
def test_bad_values_name_the_field(data, message):
    with pytest.raises(ValidationError, match=message):
        config_from_dict(data)


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="top level must be a mapping"):
        load_config(path)


@pytest.mark.parametrize("section, values, message", [
    ("workers", {"mode": "split"}, "mode"),
    ("workers", {"decode_instances": 0}, "decode_instances"),
    ("transfer", {"transport": "rdma"}, "transport"),
    ("transfer", {"deadline_s": 0}, "deadline_s"),
    ("transfer", {"receive_buffer_mib": 0}, "receive_buffer_mib"),
])
def test_disaggregation_settings_are_checked(section, values, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({section: values})


@pytest.mark.parametrize("workers, node_cpus, engines, spare", [
    ({"mode": "colocated", "instances": 1}, 2, [[0]], [1]),
    ({"mode": "colocated", "instances": 2}, 2, [[0], [1]], []),
    ({"prefill_instances": 1, "decode_instances": 1}, 4, [[0], [1]], [2, 3]),
    ({"prefill_instances": 2, "decode_instances": 2}, 2, [[0], [1], [0], [1]], []),  # wraps around the node
    ({"mode": "colocated", "instances": 1, "cpus_per_instance": 2}, 3, [[0, 1]], [2]),
    ({"mode": "colocated", "instances": 1, "bind_threads": False}, 2, [[0]], []),  # nothing bound at all
])
def test_engines_get_their_own_cores_and_actors_get_the_rest(workers, node_cpus, engines, spare):
    config = config_from_dict({"workers": workers}).workers
    assert [config.engine_cores(i, node_cpus) for i in range(config.count)] == engines
    assert config.spare_cores(node_cpus) == spare
