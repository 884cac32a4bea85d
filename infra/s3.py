"""S3 backend of the artifact store (AWS, MinIO, Ceph, moto: any endpoint boto3 can reach).

Credentials and endpoint come from the standard AWS chain (`AWS_ENDPOINT_URL` included); this module
never reads, prints or logs them.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from pathlib import Path

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from infra.artifacts import ArtifactStore, ArtifactStoreError, PermanentStoreError
from infra.durable import atomic_copy
from infra.redact import redact
from infra.safe_paths import checked_key, path_inside

PART_SIZE = 64 * 1024 * 1024
# Answers a retry cannot change.
PERMANENT_CODES = frozenset(
    {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "403", "404"}
)


def split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise ValueError(f"S3 location must be s3://bucket[/prefix], got {uri!r}")
    return bucket, prefix.strip("/")


class S3Store(ArtifactStore):
    def __init__(self, uri: str, attempts: int = 5, timeout_seconds: int = 10, client=None) -> None:
        self.bucket, self.prefix = split_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        # One bound for connecting and for any silence on the socket (an endpoint that accepts and never
        # answers): every request gives up after `attempts` x `timeout_seconds` plus the standard backoff.
        config = Config(
            retries={"mode": "standard", "max_attempts": attempts},
            connect_timeout=timeout_seconds,
            read_timeout=timeout_seconds,
        )
        self.client = client or boto3.session.Session().client("s3", config=config)
        self.transfer = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, action: str, key: str) -> Iterator[None]:
        try:
            yield
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "error")
            kind = PermanentStoreError if code in PERMANENT_CODES else ArtifactStoreError
            raise kind(f"S3 {action} s3://{self.bucket}/{self._key(key)} failed: {code}") from error
        except BotoCoreError as error:
            endpoint = redact(str(self.client.meta.endpoint_url))
            raise ArtifactStoreError(f"S3 {action} failed at {endpoint}: {redact(str(error))}") from error

    def check(self) -> None:
        """The bucket answers and these credentials may use it (a batch checks this before any work)."""
        with self._errors("check", ""):
            self.client.head_bucket(Bucket=self.bucket)

    def _head(self, key: str) -> dict | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED")
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise

    def exists(self, key: str) -> bool:
        with self._errors("head", key):
            return self._head(checked_key(key)) is not None

    @staticmethod
    def _matches(head: dict | None, sha256: str, size: int) -> bool:
        return head is not None and head["ContentLength"] == size and head.get("Metadata", {}).get("sha256") == sha256

    def _put_file(self, local: Path, key: str, sha256: str, size: int) -> bool:
        with self._errors("upload", key):
            if self._matches(self._head(key), sha256, size):
                return False
            self.client.upload_file(
                str(local),
                self.bucket,
                self._key(key),
                ExtraArgs={"Metadata": {"sha256": sha256}, "ChecksumAlgorithm": "SHA256"},
                Config=self.transfer,
            )
            head = self._head(key)
        if not self._matches(head, sha256, size):
            raise ArtifactStoreError(f"s3://{self.bucket}/{self._key(key)}: size or checksum differs after upload")
        # A multipart object's SHA-256 is a checksum of part checksums; only a single-part one is the file's.
        stored = head.get("ChecksumSHA256", "")
        if (
            stored
            and size < self.transfer.multipart_threshold
            and stored != base64.b64encode(bytes.fromhex(sha256)).decode()
        ):
            raise ArtifactStoreError(f"s3://{self.bucket}/{self._key(key)}: S3 SHA-256 differs after upload")
        return True

    def _holds(self, key: str, sha256: str) -> bool:
        with self._errors("head", key):
            head = self._head(key)
        return head is not None and head.get("Metadata", {}).get("sha256") == sha256

    def _create_text(self, key: str, text: str) -> bool:
        with self._errors("write", key):
            try:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    Body=text.encode(),
                    ChecksumAlgorithm="SHA256",
                    IfNoneMatch="*",
                )
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in {
                    "PreconditionFailed",
                    "412",
                    "ConditionalRequestConflict",
                }:
                    return False
                raise
        return True

    def _get_file(self, key: str, local: Path) -> None:
        temp = local.with_name(f".{local.name}.download")
        with self._errors("download", key):
            self.client.download_file(self.bucket, self._key(key), str(temp), Config=self.transfer)
        atomic_copy(temp, local)
        temp.unlink()

    def _read_text(self, key: str) -> str | None:
        with self._errors("read", key):
            try:
                body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in {"404", "NoSuchKey"}:
                    return None
                raise
            return body.read().decode()

    def _write_text(self, key: str, text: str) -> None:
        with self._errors("write", key):
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=text.encode(), ChecksumAlgorithm="SHA256"
            )

    def list_keys(self, key: str) -> list[str]:
        """Every key under `key/`, relative to it."""
        base = self._key(key).rstrip("/") + "/"
        keys: list[str] = []
        with self._errors("list", key):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                keys.extend(item["Key"].removeprefix(base) for item in page.get("Contents", []))
        return keys

    def download_prefix(self, key: str, dest: Path) -> Path:
        """A folder that was not stored by us (no manifest): every object under the prefix."""
        if self.read_manifest(key) is not None:
            return self.get_folder(key, dest)
        # Folder markers ("sub/") hold nothing; every other key is checked before anything is written.
        keys = [checked_key(relative) for relative in self.list_keys(key) if not relative.endswith("/")]
        if not keys:
            raise ArtifactStoreError(f"{self.url(key)}: no objects under this prefix")
        for relative in keys:
            target = path_inside(dest, relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            self._get_file(f"{key}/{relative}", target)
        return dest

    def delete_prefix(self, key: str) -> None:
        """The object `key` itself (a file) and every object under `key/` (a folder)."""
        keys = [self._key(key), *(self._key(f"{key}/{relative}") for relative in self.list_keys(key))]
        for name in keys:
            with self._errors("delete", key):
                self.client.delete_object(Bucket=self.bucket, Key=name)
