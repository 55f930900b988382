"""TLS, mutual TLS and bearer tokens on both frontends, against one deployment that enforces all three.

The certificates (a CA, the server's for 127.0.0.1, a client's, and a client's from another CA) are made at
test time; the token comes from an environment variable the config names. A client with the CA, its certificate
and the token is served on gRPC and HTTP; a missing or wrong token gets UNAUTHENTICATED / 401 with OpenAI's
error body; health checking and /health need no token; plaintext clients and clients without an accepted
certificate do not get through the handshake.
"""

from __future__ import annotations

import os
import ssl

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve_client import Client, Retry, Tls, Unauthenticated, Unavailable
from tests.conftest import start_deployment, stop_deployment
from tests.pki import Authority

pytestmark = pytest.mark.integration

TOKEN_ENV = "PDSERVE_TEST_API_TOKEN"
TOKEN = "s3cret-token-for-tests"
ONCE = Retry(max_attempts=1)  # failures of the handshake show at once


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority(folder, "pdserve-test-ca")
    other = Authority(folder, "other-ca")
    return {
        "ca": ca.pair.cert,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "stranger": other.issue("stranger", server=False),
    }


@pytest.fixture(scope="module")
def secured(tiny_model, pki):
    os.environ[TOKEN_ENV] = TOKEN
    try:
        tls = {
            "cert_file": str(pki["server"].cert),
            "key_file": str(pki["server"].key),
            "client_ca_file": str(pki["ca"]),
        }
        dep = start_deployment(
            tiny_model, {"mode": "colocated", "colocated": {"instances": 1}},
            router={"tls": tls, "auth": {"token_env": TOKEN_ENV}},
        )
    finally:
        del os.environ[TOKEN_ENV]  # read once, at start
    yield dep
    stop_deployment(dep)


def client_tls(pki, who="client"):
    return Tls.from_files(root_ca=pki["ca"], cert=pki[who].cert, key=pki[who].key)


def test_client_with_ca_certificate_and_token_is_served(secured, pki):
    with Client(secured.target, tls=client_tls(pki), token=TOKEN) as client:
        assert client.server_info().max_tokens_limit == 512
        assert client.list_models() == ["tiny-llama"]
        done = client.complete([11, 12, 13], max_tokens=8, temperature=0.0, ignore_eos=True, timeout=60)
    assert done.final.completion_tokens == len(done.token_ids) == 8
    assert done.text == secured.router.tokenizer.decode(done.token_ids)


@pytest.mark.parametrize(
    ("token", "message"),
    [(None, "missing credentials"), ("wrong-token", "invalid API token")],
    ids=["missing", "wrong"],
)
def test_grpc_calls_without_the_token_are_unauthenticated(secured, pki, token, message):
    with Client(secured.target, tls=client_tls(pki), token=token) as client:
        with pytest.raises(Unauthenticated, match=message):
            client.server_info()
        with pytest.raises(Unauthenticated, match=message):
            client.complete([11, 12, 13], max_tokens=4, timeout=30)
    assert secured.router.registry.get("colocated-0").outstanding == 0


def test_health_checking_needs_no_token(secured, pki):
    tls = client_tls(pki)
    with grpc.secure_channel(secured.target, tls.credentials()) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="pdserve.v1.Generation"), timeout=10
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("who", ["plaintext", "no-client-certificate", "foreign-client-certificate", "untrusted"])
def test_grpc_handshake_refuses(secured, pki, who):
    tls = {
        "plaintext": None,
        "no-client-certificate": Tls.from_files(root_ca=pki["ca"]),
        "foreign-client-certificate": client_tls(pki, "stranger"),
        "untrusted": Tls(cert_chain=pki["client"].cert.read_bytes(), private_key=pki["client"].key.read_bytes()),
    }[who]
    with Client(secured.target, tls=tls, token=TOKEN, retry=ONCE) as client, pytest.raises(Unavailable):
        client.server_info(timeout=10)


def https_context(pki, who="client"):
    context = ssl.create_default_context(cafile=str(pki["ca"]))
    if who is not None:
        context.load_cert_chain(str(pki[who].cert), str(pki[who].key))
    return context


@pytest.fixture(scope="module")
def https(secured, pki):
    with httpx.Client(
        base_url=f"https://127.0.0.1:{secured.http_port}", verify=https_context(pki), timeout=60
    ) as client:
        yield client


def test_openai_client_with_token_is_served(secured, pki, https):
    with openai.OpenAI(
        base_url=f"https://127.0.0.1:{secured.http_port}/v1",
        api_key=TOKEN,
        max_retries=0,
        http_client=httpx.Client(verify=https_context(pki), timeout=60),
    ) as oai:
        reply = oai.completions.create(
            model="tiny-llama", prompt=[11, 12, 13], max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
        )
        assert reply.usage.completion_tokens == 6
        assert [m.id for m in oai.models.list().data] == ["tiny-llama"]
    assert https.get("/health").status_code == 200  # probes need no token


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing credentials"),
        ({"Authorization": "Bearer nope"}, "invalid API token"),
        ({"Authorization": f"Basic {TOKEN}"}, "malformed authorization"),
    ],
    ids=["missing", "wrong", "other-scheme"],
)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/models"])
def test_http_without_the_token_gets_401(https, headers, message, path):
    body = {"model": "tiny-llama", "prompt": "Hi", "max_tokens": 4}
    reply = https.post(path, json=body, headers=headers) if path != "/v1/models" else https.get(path, headers=headers)
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"].startswith("Bearer")
    error = reply.json()["error"]
    assert message in error["message"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_api_key", None)


def test_openai_client_with_a_wrong_token_gets_authentication_error(secured, pki):
    with (
        openai.OpenAI(
            base_url=f"https://127.0.0.1:{secured.http_port}/v1",
            api_key="wrong",
            max_retries=0,
            http_client=httpx.Client(verify=https_context(pki), timeout=60),
        ) as oai,
        pytest.raises(openai.AuthenticationError, match="invalid API token"),
    ):
        oai.completions.create(model="tiny-llama", prompt="Hi", max_tokens=4)


@pytest.mark.parametrize("who", ["plaintext", "no-client-certificate", "foreign-client-certificate"])
def test_https_handshake_refuses(secured, pki, who):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    if who == "plaintext":
        url, verify = f"http://127.0.0.1:{secured.http_port}/health", True
    else:
        url, verify = (
            f"https://127.0.0.1:{secured.http_port}/health",
            https_context(pki, None if who == "no-client-certificate" else "stranger"),
        )
    with httpx.Client(verify=verify, timeout=10) as client, pytest.raises(httpx.TransportError):
        client.get(url, headers=headers)
