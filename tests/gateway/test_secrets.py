"""Credential references, per-tool/per-environment scoping, and redaction of resolved values."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import pytest

from controltower.gateway.secrets import (
    MASK,
    RedactingFilter,
    Redactor,
    SecretNotFound,
    SecretRefInvalid,
    SecretScope,
    SecretUnreadable,
    default_redactor,
    install_log_redaction,
    is_secret_key,
    resolve_secret,
)
from controltower.gateway.tools import Binding, ToolDefinition
from controltower.spec.errors import TowerError

# -- references ------------------------------------------------------------------------------


def test_env_reference_resolves_and_registers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CT_TEST_TOKEN", "tok-env-abcdef")
    redactor = Redactor()
    assert resolve_secret("env:CT_TEST_TOKEN", redactor=redactor) == "tok-env-abcdef"
    assert redactor.redact_text("Bearer tok-env-abcdef") == f"Bearer {MASK}"


def test_resolved_values_reach_the_process_redactor_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CT_TEST_DEFAULT", "tok-default-98765")
    resolve_secret("env:CT_TEST_DEFAULT")
    assert "tok-default-98765" not in default_redactor().redact_text("x tok-default-98765 y")


def test_file_reference_strips_one_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("file-secret-1234\n", encoding="utf-8")
    assert resolve_secret(f"file:{path}", redactor=Redactor()) == "file-secret-1234"
    path.write_bytes(b"crlf-secret-1234\r\n")
    assert resolve_secret(f"file:{path}", redactor=Redactor()) == "crlf-secret-1234"
    path.write_text("  spaced-secret  \n\n", encoding="utf-8")  # only one newline is ours to strip
    assert resolve_secret(f"file:{path}", redactor=Redactor()) == "  spaced-secret  \n"


def test_missing_env_variable_names_it_and_nothing_else(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CT_TEST_MISSING", raising=False)
    with pytest.raises(SecretNotFound, match="CT_TEST_MISSING") as info:
        resolve_secret("env:CT_TEST_MISSING")
    assert info.value.code == "secret_not_found"
    assert isinstance(info.value, TowerError)
    assert "export CT_TEST_MISSING" in (info.value.hint or "")
    monkeypatch.setenv("CT_TEST_MISSING", "")
    with pytest.raises(SecretNotFound, match="empty"):
        resolve_secret("env:CT_TEST_MISSING")


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(SecretNotFound, match="does not exist"):
        resolve_secret(f"file:{tmp_path / 'nope'}")
    with pytest.raises(SecretUnreadable, match="directory"):
        resolve_secret(f"file:{tmp_path}")
    (tmp_path / "empty").write_text("", encoding="utf-8")
    with pytest.raises(SecretNotFound, match="empty"):
        resolve_secret(f"file:{tmp_path / 'empty'}")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00secret")
    with pytest.raises(SecretUnreadable, match="UTF-8"):
        resolve_secret(f"file:{binary}")
    with pytest.raises(SecretRefInvalid, match="absolute"):
        resolve_secret("file:relative/token")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_file_without_permission_is_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "locked"
    path.write_text("locked-secret", encoding="utf-8")
    path.chmod(0)
    with pytest.raises(SecretUnreadable, match="not readable"):
        resolve_secret(f"file:{path}")


@pytest.mark.parametrize(
    "ref",
    [
        "sk-live-0123456789abcdef",  # a pasted key
        "hunter2hunter2",
        "Bearer abc.def.ghi",
        "vault:secret/data/crm",  # a scheme we do not support
        "env:sk-live-0123456789",  # 'env:' followed by a value, not a name
        "ENV:MY_TOKEN",
        "",
    ],
)
def test_anything_but_env_or_file_is_refused_without_echoing_it(ref: str) -> None:
    with pytest.raises(SecretRefInvalid) as info:
        resolve_secret(ref)
    text = f"{info.value} {info.value.hint}"
    assert "env:NAME" in text or "environment variable" in text
    if ref:
        assert ref not in text
        assert ref.partition(":")[2] not in text or not ref.partition(":")[2]


# -- redaction -------------------------------------------------------------------------------


def test_redaction_in_nested_structures_keys_and_values() -> None:
    redactor = Redactor(["s3cr3t-value", "tok-zyxw"])
    data = {
        "message": "auth failed for s3cr3t-value",
        "nested": [{"headers": ("ok", "x tok-zyxw y")}, "plain"],
        "s3cr3t-value": "a key that is itself a secret",
        "count": 3,
        "none": None,
    }
    out = redactor.redact(data)
    assert out == {
        "message": f"auth failed for {MASK}",
        "nested": [{"headers": ("ok", f"x {MASK} y")}, "plain"],
        MASK: "a key that is itself a secret",
        "count": 3,
        "none": None,
    }
    assert data["message"] == "auth failed for s3cr3t-value"  # a copy; the input is untouched


def test_values_of_secret_looking_keys_are_masked() -> None:
    redactor = Redactor()
    data = {
        "password": "pw",
        "Authorization": "Bearer xyz",
        "X-Api-Key": 12345,
        "api_key": {"nested": "whatever"},
        "accessToken": "abc",
        "client_secret": "c",
        "Set-Cookie": "id=1",
        "db": {"PASSWORD": "deep"},
        "input_tokens": 812,
        "token_count": 5,
        "empty_password": "",
        "secret_name": None,
    }
    out = redactor.redact(data)
    for key in (
        "password",
        "Authorization",
        "X-Api-Key",
        "api_key",
        "accessToken",
        "client_secret",
        "Set-Cookie",
    ):
        assert out[key] == MASK, key
    assert out["db"] == {"PASSWORD": MASK}
    assert out["input_tokens"] == 812  # usage counters are not secrets
    assert out["token_count"] == 5
    assert out["empty_password"] == ""
    assert out["secret_name"] is None


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("token", True),
        ("refresh_token", True),
        ("passwd", True),
        ("credentials", True),
        ("privateKey", True),
        ("cookies", True),
        ("tokens", False),
        ("max_tokens", False),
        ("author", False),
        ("keyboard", False),
        ("", False),
    ],
)
def test_is_secret_key(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


def test_short_values_are_not_registered() -> None:
    redactor = Redactor()
    assert redactor.register("abc") is False
    assert redactor.register("abcd") is True
    assert redactor.redact_text("abc abcd") == f"abc {MASK}"


def test_encoded_forms_and_overlapping_secrets_are_masked() -> None:
    redactor = Redactor(['pa ss/"word"', "abcdef", "abcdefgh"])
    assert redactor.redact_text("u=pa%20ss%2F%22word%22") == f"u={MASK}"  # URL-encoded
    assert redactor.redact_text('{"p": "pa ss/\\"word\\""}') == f'{{"p": "{MASK}"}}'  # JSON-escaped
    assert redactor.redact_text("abcdefgh") == MASK  # the longest match wins: nothing left over


def test_redactor_is_thread_safe() -> None:
    redactor = Redactor()
    values = [f"secret-value-{i:04d}" for i in range(400)]
    errors: list[BaseException] = []

    def register(chunk: list[str]) -> None:
        try:
            for value in chunk:
                redactor.register(value)
                assert value not in redactor.redact_text(f"<{value}>")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(values[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    text = " ".join(values)
    assert redactor.redact_text(text) == " ".join([MASK] * len(values))


def test_log_records_are_redacted(caplog: pytest.LogCaptureFixture) -> None:
    redactor = Redactor(["log-secret-4321"])
    uninstall = install_log_redaction(redactor)
    logger = logging.getLogger("controltower.gateway.test_secrets")
    try:
        with caplog.at_level(logging.INFO, logger="controltower"):
            logger.info("calling with %s", "log-secret-4321")
            logger.info("mapping %(token)s and %(user)s", {"token": "xyz-not-registered", "user": "ann"})
            try:
                raise RuntimeError("upstream said log-secret-4321")
            except RuntimeError:
                logger.exception("failed")
            logging.getLogger("controltower").warning("direct log-secret-4321")
    finally:
        uninstall()
    assert "log-secret-4321" not in caplog.text
    assert "xyz-not-registered" not in caplog.text
    assert f"calling with {MASK}" in caplog.text
    assert f"mapping {MASK} and ann" in caplog.text
    assert f"upstream said {MASK}" in caplog.text
    assert f"direct {MASK}" in caplog.text
    caplog.clear()
    logger.warning("after uninstall log-secret-4321")
    assert "log-secret-4321" in caplog.text  # the filter really was what masked it


def test_filter_never_drops_records_and_survives_bad_formats() -> None:
    filt = RedactingFilter(Redactor(["fmt-secret-1111"]))
    record = logging.LogRecord("controltower", logging.INFO, __file__, 1, "%d fmt-secret-1111", ("x",), None)
    assert filt.filter(record) is True
    assert "fmt-secret-1111" not in str(record.msg)


# -- scopes ----------------------------------------------------------------------------------


def _tool(name: str = "crm.update") -> ToolDefinition:
    return ToolDefinition(
        name=name,
        side_effect="write",
        environments={
            "dev": Binding(endpoint="https://sandbox", credentials={"token": "env:CT_CRM_DEV_TOKEN"}),
            "prod": Binding(
                endpoint="https://crm",
                credentials={"token": "env:CT_CRM_PROD_TOKEN", "client_cert": "file:/nonexistent/crm.pem"},
            ),
        },
    )


def test_scope_resolves_only_its_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CT_CRM_DEV_TOKEN", "dev-token-1111")
    monkeypatch.delenv("CT_CRM_PROD_TOKEN", raising=False)
    redactor = Redactor()
    dev = SecretScope(_tool(), "dev", redactor)
    assert dev.resolve() == {"token": "dev-token-1111"}
    assert redactor.redact_text("dev-token-1111") == MASK
    assert "dev-token-1111" not in repr(dev)
    # prod's credentials are different references and are never read in dev
    with pytest.raises(SecretNotFound, match=r"'crm.update' credential 'token' \(prod\).*CT_CRM_PROD_TOKEN"):
        SecretScope(_tool(), "prod", redactor).resolve()
    assert SecretScope(_tool(), "staging", redactor).resolve() == {}  # no binding, no credentials


def test_prod_and_dev_bindings_get_different_credentials(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    cert = tmp_path / "crm.pem"
    cert.write_text("cert-contents-prod\n", encoding="utf-8")
    monkeypatch.setenv("CT_CRM_DEV_TOKEN", "dev-token-2222")
    monkeypatch.setenv("CT_CRM_PROD_TOKEN", "prod-token-3333")
    tool = ToolDefinition(
        name="crm.update",
        environments={
            "dev": Binding(credentials={"token": "env:CT_CRM_DEV_TOKEN"}),
            "prod": Binding(credentials={"token": "env:CT_CRM_PROD_TOKEN", "cert": f"file:{cert}"}),
        },
    )
    assert SecretScope(tool, "dev").resolve() == {"token": "dev-token-2222"}
    assert SecretScope(tool, "prod").resolve() == {"token": "prod-token-3333", "cert": "cert-contents-prod"}


def test_scope_with_a_literal_secret_in_the_binding_is_refused() -> None:
    tool = ToolDefinition(
        name="bad.tool", environments={"dev": Binding(credentials={"key": "sk-literal-0000"})}
    )
    with pytest.raises(SecretRefInvalid) as info:
        SecretScope(tool, "dev").resolve()
    assert "sk-literal-0000" not in str(info.value)
    assert "'bad.tool' credential 'key'" in str(info.value)
