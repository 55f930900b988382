"""Frontend security's pure parts: the bearer check, reading the secrets the config points to, config checks."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pdserve.config import AuthConfig, TlsConfig, config_from_dict, load_config
from router.security import check_bearer, load_security

TOKEN = "tok-123"


@pytest.mark.parametrize(
    ("header", "refusal"),
    [
        (None, "missing credentials"),
        ("", "missing credentials"),
        ("Bearer", "malformed authorization"),
        ("Bearer   ", "malformed authorization"),
        (f"Basic {TOKEN}", "malformed authorization"),
        ("Bearer tok-12", "invalid API token"),
        ("Bearer tok-1234", "invalid API token"),
        (f"Bearer {TOKEN.upper()}", "invalid API token"),
    ],
)
def test_bearer_refusals_say_why(header, refusal):
    assert refusal in check_bearer(header, TOKEN)


@pytest.mark.parametrize("header", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"  Bearer {TOKEN}  "])
def test_the_right_token_passes(header):
    assert check_bearer(header, TOKEN) is None


def test_security_is_off_by_default():
    router = load_config().router
    assert not router.tls.enabled and not router.auth.enabled
    security = load_security(router.tls, router.auth, environ={})
    assert security.token is None and not security.tls.enabled


def test_the_token_comes_from_the_named_environment_variable():
    auth = AuthConfig(token_env="MY_TOKEN")
    assert load_security(TlsConfig(), auth, environ={"MY_TOKEN": f" {TOKEN}\n"}).token == TOKEN
    with pytest.raises(ValueError, match="the API token is empty: set the environment variable MY_TOKEN"):
        load_security(TlsConfig(), auth, environ={})


def test_the_token_comes_from_a_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")
    assert load_security(TlsConfig(), AuthConfig(token_file=str(path)), environ={}).token == TOKEN
    path.write_text("two words")
    with pytest.raises(ValueError, match="printable ASCII without spaces"):
        load_security(TlsConfig(), AuthConfig(token_file=str(path)), environ={})
    with pytest.raises(ValueError, match="router.auth.token_file: cannot read"):
        load_security(TlsConfig(), AuthConfig(token_file=str(tmp_path / "absent")), environ={})


def test_unreadable_tls_files_are_named(tmp_path):
    cert = tmp_path / "server.crt"
    cert.write_text("pem")
    tls = TlsConfig(cert_file=str(cert), key_file=str(tmp_path / "server.key"))
    with pytest.raises(ValueError, match=r"router.tls.key_file: cannot read .*server.key"):
        load_security(tls, AuthConfig(), environ={})


@pytest.mark.parametrize(
    ("router", "message"),
    [
        ({"tls": {"cert_file": "a.crt"}}, "cert_file and router.tls.key_file must be set together"),
        ({"tls": {"key_file": "a.key"}}, "cert_file and router.tls.key_file must be set together"),
        ({"tls": {"client_ca_file": "ca.crt"}}, "client_ca_file .* needs router.tls.cert_file"),
        ({"auth": {"token_env": "A", "token_file": "b"}}, "set token_env or token_file, not both"),
        ({"auth": {"token_env": ""}}, "token_env must name an environment variable"),
        ({"auth": {"token": "inline"}}, "token"),  # no field holds a secret itself
    ],
)
def test_security_config_is_checked(router, message):
    with pytest.raises(ValidationError, match=message):
        config_from_dict({"router": router})


def test_security_config_reads_paths_and_names():
    config = config_from_dict(
        {
            "router": {
                "tls": {"cert_file": "s.crt", "key_file": "s.key", "client_ca_file": "ca.crt"},
                "auth": {"token_env": "PDSERVE_API_TOKEN"},
            }
        }
    )
    assert config.router.tls == TlsConfig("s.crt", "s.key", "ca.crt") and config.router.tls.enabled
    assert config.router.auth == AuthConfig(token_env="PDSERVE_API_TOKEN") and config.router.auth.enabled


def test_the_token_never_shows_in_a_repr():
    security = load_security(TlsConfig(), AuthConfig(token_env="PDSERVE_T"), environ={"PDSERVE_T": "sekrit-tok"})
    assert security.token == "sekrit-tok"
    for text in (repr(security), str(security), f"{security!r}"):
        assert "sekrit-tok" not in text and "<redacted>" in text
