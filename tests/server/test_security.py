"""TLS, mutual TLS and API keys, over real servers on loopback (certificates made in the test)."""

from __future__ import annotations

import grpc
import pytest

from loong_jax.server.auth import ApiKeySet, load_api_keys, presented_key
from loong_jax.server.client import SERVICE_NAME, LoongClient
from loong_jax.server.tls import TlsConfig
from tests.server.certs import issue, make_ca, write_pem
from tests.server.harness import start_server, status_code

PROMPT = "Return the number of"
CALL_TIMEOUT_S = 10


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    server_ca, client_ca, rogue_ca = make_ca("server ca"), make_ca("client ca"), make_ca("rogue ca")
    paths = {"server_ca": folder / "server_ca.crt", "client_ca": folder / "client_ca.crt",
             "rogue_ca": folder / "rogue_ca.crt"}
    paths["server_ca"].write_bytes(server_ca.cert_pem)
    paths["client_ca"].write_bytes(client_ca.cert_pem)
    paths["rogue_ca"].write_bytes(rogue_ca.cert_pem)
    paths["server_cert"], paths["server_key"] = write_pem(folder, "server", issue(server_ca, "loong-jax", server=True))
    paths["client_cert"], paths["client_key"] = write_pem(folder, "client", issue(client_ca, "alice", server=False))
    paths["rogue_cert"], paths["rogue_key"] = write_pem(folder, "rogue", issue(rogue_ca, "mallory", server=False))
    return paths


def test_tls(loop_thread, engine_port, pki):
    handle = start_server(loop_thread, engine_port, tls=TlsConfig.from_flags(pki["server_cert"], pki["server_key"]))
    try:
        with LoongClient(handle.target, root_ca=pki["server_ca"]) as client:
            assert client.complete(PROMPT, max_tokens=2, temperature=0).finish_reason == "length"
            assert client.health(SERVICE_NAME) == "SERVING"
        with LoongClient(handle.target) as plaintext:  # no TLS: the handshake never completes
            assert status_code(lambda: plaintext.tokenize("x", timeout=CALL_TIMEOUT_S)) == grpc.StatusCode.UNAVAILABLE
        with LoongClient(handle.target, root_ca=pki["rogue_ca"]) as untrusting:  # server cert not trusted
            assert status_code(lambda: untrusting.tokenize("x", timeout=CALL_TIMEOUT_S)) == grpc.StatusCode.UNAVAILABLE
    finally:
        handle.stop()


def test_mutual_tls_needs_a_client_certificate_from_the_ca(loop_thread, engine_port, pki):
    tls = TlsConfig.from_flags(pki["server_cert"], pki["server_key"], pki["client_ca"])
    assert tls.mutual
    handle = start_server(loop_thread, engine_port, tls=tls)
    try:
        with LoongClient(handle.target, root_ca=pki["server_ca"], client_cert=pki["client_cert"],
                         client_key=pki["client_key"]) as client:
            assert client.complete(PROMPT, max_tokens=2, temperature=0).finish_reason == "length"
        with LoongClient(handle.target, root_ca=pki["server_ca"]) as no_cert:
            assert status_code(lambda: no_cert.tokenize("x", timeout=CALL_TIMEOUT_S)) == grpc.StatusCode.UNAVAILABLE
        with LoongClient(handle.target, root_ca=pki["server_ca"], client_cert=pki["rogue_cert"],
                         client_key=pki["rogue_key"]) as rogue:
            assert status_code(lambda: rogue.tokenize("x", timeout=CALL_TIMEOUT_S)) == grpc.StatusCode.UNAVAILABLE
    finally:
        handle.stop()


def test_api_keys_right_wrong_and_missing(loop_thread, engine_port, tmp_path):
    key_file = tmp_path / "keys.txt"
    key_file.write_text("# operators\nalpha-key-123\n\n  beta-key-456  \n")
    keys = load_api_keys(["gamma-key-789"], key_file)
    assert len(keys) == 3
    handle = start_server(loop_thread, engine_port, api_keys=keys)
    try:
        for key in ("alpha-key-123", "beta-key-456", "gamma-key-789"):
            with LoongClient(handle.target, api_key=key) as client:
                assert client.complete(PROMPT, max_tokens=2, temperature=0).finish_reason == "length"
                assert client.tokenize("hello") and client.server_info().ready
        with LoongClient(handle.target) as anonymous:
            for call in (lambda: anonymous.complete(PROMPT, max_tokens=1), lambda: anonymous.tokenize("x"),
                         lambda: anonymous.abort("any"), lambda: anonymous.server_info()):
                assert status_code(call) == grpc.StatusCode.UNAUTHENTICATED
            assert anonymous.health() == "SERVING" and anonymous.health(SERVICE_NAME) == "SERVING"  # no key needed
        for wrong in ("alpha-key-12", "alpha-key-1234", "ALPHA-KEY-123", " ", "beta-key-456 x"):
            with LoongClient(handle.target, api_key=wrong) as client:
                with pytest.raises(grpc.RpcError) as err:
                    client.complete(PROMPT, max_tokens=1)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert "API key" in err.value.details()
        with LoongClient(handle.target) as client:  # the x-api-key header works too
            completion = client.complete(PROMPT, max_tokens=1, metadata=[("x-api-key", "beta-key-456")])
            assert completion.finish_reason == "length"
        assert 'code="UNAUTHENTICATED"' in handle.server.metrics.exposition().decode()
    finally:
        handle.stop()


def test_api_key_parsing_and_checks(tmp_path):
    keys = ApiKeySet(["k-one", "k-two"])
    assert keys.matches("k-one") and keys.matches("k-two")
    assert not keys.matches("k-on") and not keys.matches("") and not keys.matches(None)
    for bad in ([], [""], ["  "], [" padded"]):
        with pytest.raises(ValueError):
            ApiKeySet(bad)
    assert load_api_keys(None, None) is None
    with pytest.raises(ValueError, match="--api-key-file"):
        load_api_keys(None, tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(ValueError, match="holds no key"):
        load_api_keys(None, empty)
    assert presented_key([("authorization", "Bearer abc")]) == "abc"
    assert presented_key([("Authorization", "bearer  abc ")]) == "abc"
    assert presented_key([("x-api-key", "xyz")]) == "xyz"
    assert presented_key([("authorization", "Basic abc")]) is None
    assert presented_key([("other-bin", b"\x00")]) is None


def test_tls_flags_are_checked_before_anything_starts(pki, tmp_path):
    assert TlsConfig.from_flags(None, None) is None
    with pytest.raises(ValueError, match="--tls-key is missing"):
        TlsConfig.from_flags(pki["server_cert"], None)
    with pytest.raises(ValueError, match="--tls-client-ca needs --tls-cert"):
        TlsConfig.from_flags(None, None, pki["client_ca"])
    with pytest.raises(ValueError, match="--tls-cert .*missing.pem"):
        TlsConfig.from_flags(tmp_path / "missing.pem", pki["server_key"])
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    with pytest.raises(ValueError, match="not a PEM file"):
        TlsConfig.from_flags(pki["server_cert"], not_pem)
