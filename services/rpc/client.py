"""Client channels for every role: auth token, TLS, message limits and retry policy in one place."""

from __future__ import annotations

import json
import os

import grpc

from services.rpc.server import MAX_MESSAGE_BYTES

# Retry transient failures of idempotent calls (every DraftFlow RPC is idempotent or fenced).
_RETRY_POLICY = {
    "methodConfig": [
        {
            "name": [{"service": "draftflow.v1.CoordinatorService"}],
            "retryPolicy": {
                "maxAttempts": 5,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ]
}


class _BearerAuth(grpc.AuthMetadataPlugin):
    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, context: grpc.AuthMetadataContext,
                 callback: grpc.AuthMetadataPluginCallback) -> None:
        callback((("authorization", f"Bearer {self._token}"),), None)


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor):
    """Adds the bearer token on plaintext channels (call credentials need TLS)."""

    def __init__(self, token: str) -> None:
        self._md = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        md = [*(details.metadata or ()), self._md]
        return details._replace(metadata=md)  # type: ignore[attr-defined]

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), requests)


def open_channel(
    target: str,
    token: str | None = None,
    tls_ca: str | None = None,
) -> grpc.Channel:
    """Open a channel to ``target`` (HOST:PORT). ``token`` defaults to $DRAFTFLOW_TOKEN."""
    token = token if token is not None else os.environ.get("DRAFTFLOW_TOKEN") or None
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", json.dumps(_RETRY_POLICY)),
    ]
    if tls_ca:
        with open(tls_ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(f.read())
        if token:
            creds = grpc.composite_channel_credentials(
                creds, grpc.metadata_call_credentials(_BearerAuth(token))
            )
        return grpc.secure_channel(target, creds, options=options)
    channel = grpc.insecure_channel(target, options=options)
    if token:
        channel = grpc.intercept_channel(channel, _TokenInterceptor(token))
    return channel
