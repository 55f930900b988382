"""`transfer.transport: nccl` is accepted, refused on an engine without a GPU, and selects the NCCL shell."""

from __future__ import annotations

import pytest

from kv_transfer.config import ConnectorSettings, TransferConfig, from_extra


def test_nccl_is_a_transport_and_survives_the_trip_through_the_connector_settings() -> None:
    s = ConnectorSettings("decode-0", 2, TransferConfig(transport="nccl"))
    assert ConnectorSettings.from_extra(s.to_extra()).transfer.transport == "nccl"


def test_an_unknown_transport_names_the_field_and_every_allowed_value() -> None:
    with pytest.raises(ValueError, match=r"transfer.transport must be one of 'auto', 'shm', 'tcp', 'nccl'"):
        from_extra({"transport": "rdma"})


def test_nccl_on_an_engine_without_a_gpu_is_a_config_error_naming_what_would_do() -> None:
    with pytest.raises(ValueError, match=r"transfer.transport: 'nccl' needs GPU engines.*'auto', 'shm', 'tcp'"):
        TransferConfig(transport="nccl").check_engine(gpu=False)
    TransferConfig(transport="nccl").check_engine(gpu=True)
    TransferConfig(transport="tcp").check_engine(gpu=False)


def test_the_connector_builds_the_nccl_side_only_for_nccl_and_refuses_it_on_this_cpu_engine() -> None:
    torch = pytest.importorskip("torch")
    from kv_transfer.connector import nccl_plane

    assert nccl_plane(ConnectorSettings("p-0", 1, TransferConfig(transport="tcp"))) is None
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="transfer.transport: 'nccl' needs GPU engines"):
            nccl_plane(ConnectorSettings("p-0", 1, TransferConfig(transport="nccl")))
