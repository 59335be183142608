"""Conformance plug-in for the s3 backend (see tests/backends/conformance.py)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config

from tests.helpers import free_port

if TYPE_CHECKING:
    from agent.runner import ElectionRunner

SERVER_FIXTURE = "s3_url"
#: leader_timeout defaults to the TTL. A crashed leader is replaced within leader_timeout +
#: infrequent_interval, so poll a little more often than the defaults (TTL/4, TTL/2).
TTL = 2.0


def bucket_for(election: str) -> str:
    """One bucket per election: parallel tests never share a seat (and bucket creation runs)."""
    return "electorate-test-" + hashlib.sha256(election.encode()).hexdigest()[:20]


def options(server: str | None, election: str, index: int, n: int) -> dict[str, Any]:
    assert server is not None
    return {
        "endpoint": server,
        "bucket": bucket_for(election),
        "frequent_interval": "250ms",
        "infrequent_interval": "400ms",
    }


def client(server: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=server,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=Config(
            connect_timeout=2,
            read_timeout=5,
            retries={"max_attempts": 1},
            s3={"addressing_style": "path"},
        ),
    )


async def cut_off(runner: ElectionRunner, server: str | None) -> None:
    """Make S3 unreachable for this runner only: swap its client for one aimed at a closed
    port. Its renewals then fail as transport errors and it must demote itself when its lease
    runs out, before any other agent can call the seat stale."""
    backend = runner.backend
    dead = f"http://127.0.0.1:{free_port()}"
    backend._client = await asyncio.to_thread(backend._make_client, dead)  # type: ignore[attr-defined]


async def remove_seat(server: str | None, election: str) -> None:
    """Delete the seat object from outside, as an operator's ``aws s3 rm`` would: the next
    read of any agent finds it gone, while the leader learns of it only at its next renewal."""
    assert server is not None
    s3 = client(server)
    await asyncio.to_thread(
        s3.delete_object, Bucket=bucket_for(election), Key=f"electorate/{election}.json"
    )


def delete_bucket(server: str, bucket: str) -> None:
    s3 = client(server)
    with contextlib.suppress(s3.exceptions.NoSuchBucket):
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                s3.delete_object(Bucket=bucket, Key=item["Key"])
        s3.delete_bucket(Bucket=bucket)


async def cleanup(server: str | None, election: str) -> None:
    assert server is not None
    await asyncio.to_thread(delete_bucket, server, bucket_for(election))
