import pytest
from pydantic import ValidationError

from pdserve.config import ServeConfig, config_from_dict, load_config


def test_embedded_default_is_local_cpu_smollm2():
    config = load_config()
    assert config.ray.address is None
    assert config.engine.model == "smollm2-135m-instruct"
    assert config.workers.mode == "disaggregated"
    assert config.workers.layout() == "1P1D"
    assert config.transfer.layerwise


def test_empty_file_means_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("")
    assert load_config(path) == ServeConfig()


def test_sections_override_defaults():
    config = config_from_dict({"workers": {"colocated": {"instances": 3}}, "router": {"policy": "round_robin"}})
    assert config.workers.colocated.instances == 3
    assert config.router.policy == "round_robin"
    assert config.engine == ServeConfig().engine


def test_unknown_keys_are_errors():
    with pytest.raises(ValidationError, match="instancez"):
        config_from_dict({"workers": {"prefill": {"instancez": 3}}})
    with pytest.raises(ValidationError, match="routr"):
        config_from_dict({"routr": {}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
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
    ("transfer", {"transport": "rdma"}, "transport"),
    ("transfer", {"deadline_s": 0}, "deadline_s"),
    ("transfer", {"receive_buffer_mib": 0}, "receive_buffer_mib"),
])
def test_disaggregation_settings_are_checked(section, values, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({section: values})


def test_pools_reserve_their_resources_and_override_the_engine():
    config = config_from_dict({
        "engine": {"max_num_seqs": 8},
        "workers": {"prefill": {"instances": 2, "resources": {"pdserve-prefill": 1}},
                    "decode": {"cpus": 2, "gpus": 1, "engine": {"max_num_seqs": 64, "kv_cache_gib": 4}}},
    })
    (prefill_role, prefill), (decode_role, decode) = config.workers.pools()
    assert (prefill_role, prefill.instances, prefill.resources) == ("prefill", 2, {"pdserve-prefill": 1})
    assert prefill.engine_config(config.engine) == config.engine
    assert (decode_role, decode.cpus, decode.gpus) == ("decode", 2, 1)
    engine = decode.engine_config(config.engine)
    assert (engine.max_num_seqs, engine.kv_cache_gib, engine.dtype) == (64, 4, config.engine.dtype)
    assert config.workers.layout() == "2P1D" and config.workers.count == 3


@pytest.mark.parametrize("workers, message", [
    ({"decode": {"instances": 0}}, "instances must be >= 1"),
    ({"prefill": {"cpus": 0}}, "cpus must be >= 1"),
    ({"prefill": {"resources": {"pdserve-prefill": 0}}}, "every resource amount > 0"),
    ({"decode": {"engine": {"max_num_seqz": 4}}}, r"engine overrides \['max_num_seqz'\] are not engine settings"),
    ({"decode": {"engine": {"kv_cache_gib": 0}}}, "workers.decode.engine: engine.kv_cache_gib must be > 0"),
    ({"colocated": {"instancez": 2}}, "instancez"),
])
def test_bad_pools_name_the_field(workers, message):
    with pytest.raises(ValueError, match=message):
        config_from_dict({"workers": workers})


def test_the_nccl_transport_needs_gpu_pools_and_says_so_at_load():
    with pytest.raises(ValidationError, match=r"workers.prefill: transfer.transport: 'nccl' needs GPU engines"):
        config_from_dict({"transfer": {"transport": "nccl"}})
    gpu = {"instances": 1, "gpus": 1}
    config = config_from_dict({"transfer": {"transport": "nccl"}, "workers": {"prefill": gpu, "decode": gpu}})
    assert config.transfer.transport == "nccl"
