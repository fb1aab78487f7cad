"""TLS and mutual TLS for the gRPC server and client.

Data flow:
  1. `TlsConfig.from_flags(cert, key, client_ca)` checks the flags go together (a certificate needs
     its key; a client CA needs a server certificate) and reads the PEM files once, failing with one
     line that names the flag and the file.
  2. `server_credentials()` builds `grpc.ssl_server_credentials`; with a client CA the server
     requires and verifies a client certificate (mutual TLS), so a client without one cannot even
     finish the handshake.
  3. `client_channel_credentials(...)` is the client side: the CA that signed the server's
     certificate, plus the client's own certificate and key for mutual TLS.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grpc


def _read_pem(flag: str, path: str | Path) -> bytes:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ValueError(f"{flag} {path}: {err.strerror or err}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag} {path}: not a PEM file")
    return data


def _pem_or_path(flag: str, value: bytes | str | Path | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return _read_pem(flag, value)


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None  # set: mutual TLS, clients must present a certificate it signed

    @classmethod
    def from_flags(cls, cert: str | Path | None, key: str | Path | None,
                   client_ca: str | Path | None = None) -> "TlsConfig | None":
        """None when no TLS flag is given (plaintext, fit for loopback only)."""
        if cert is None and key is None:
            if client_ca is not None:
                raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)")
            return None
        if cert is None or key is None:
            missing = "--tls-cert" if cert is None else "--tls-key"
            raise ValueError(f"TLS needs both --tls-cert and --tls-key; {missing} is missing")
        return cls(certificate_chain=_read_pem("--tls-cert", cert), private_key=_read_pem("--tls-key", key),
                   client_ca=None if client_ca is None else _read_pem("--tls-client-ca", client_ca))

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.mutual,
        )


def client_channel_credentials(root_ca: bytes | str | Path | None = None,
                               client_cert: bytes | str | Path | None = None,
                               client_key: bytes | str | Path | None = None) -> grpc.ChannelCredentials:
    """Channel credentials for a TLS server; `root_ca` None trusts the system's CAs."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("a client certificate needs its key (client_cert and client_key go together)")
    return grpc.ssl_channel_credentials(
        root_certificates=_pem_or_path("root_ca", root_ca),
        private_key=_pem_or_path("client_key", client_key),
        certificate_chain=_pem_or_path("client_cert", client_cert),
    )
