"""Inference tables: the local workspace logs every request of an endpoint whose AI Gateway
inference table is on, in the background, losing nothing on a clean shutdown and failing no
request when the table cannot be written; endpoint metrics are computed from that table."""

from __future__ import annotations

import datetime as dt
import functools
import json
import time

import pytest
import requests
from databricks.sdk.errors import BadRequest
from databricks.sdk.service.serving import AiGatewayInferenceTableConfig
from deltalake import DeltaTable

from lakevision.monitoring.endpoint_stats import MONITORING_TABLE, endpoint_stats, write_stats
from lakevision.serving.client import workspace_client
from lakevision.serving.inference_log import (MAX_PAYLOAD_BYTES, MAX_REQUEST_BYTES, PAYLOAD_TOO_LARGE, InferenceLogger,
                                             inference_row, split_client_request_id)
from lakevision.local.workspace import endpoints
from lakevision.local.workspace.endpoints import LocalWorkspace
from lakevision.serving.endpoint_metrics import parse_endpoint_metrics, parse_rows_dropped
from lakevision.tracking import local_tracking_uri

from .test_workspace import RECORDS, TOKEN, V1, V2, entity, name_of, registry, split  # noqa: F401
from .test_workspace import config as endpoint_config

SENT_OK, SENT_BAD = 40, 6
BIG_IMAGE = "A" * (MAX_PAYLOAD_BYTES + 10)  # a valid string input to the test models, over the 1 MB log limit
# the AI Gateway inference table, column by column (docs.databricks.com ai-gateway/inference-tables)
AI_GATEWAY_COLUMNS = {
    "request_date": "date", "databricks_request_id": "string", "client_request_id": "string",
    "request_time": "timestamp", "status_code": "integer", "sampling_fraction": "double",
    "execution_duration_ms": "long", "request": "string", "response": "string", "served_entity_id": "string",
    "logging_error_codes": "array", "requester": "string"}


def _table(schema="lakevision", prefix="ep"):
    return AiGatewayInferenceTableConfig(schema_name=schema, table_name_prefix=prefix, enabled=True)


@pytest.fixture(scope="module")
def logged(registry, tmp_path_factory):  # noqa: F811
    """One endpoint at 75/25 with its inference table on, queried, then the workspace stopped."""
    root = tmp_path_factory.mktemp("ws-logged")
    with LocalWorkspace(root, TOKEN, tracking_uri=local_tracking_uri(registry), seed=3) as ws:
        w = workspace_client(ws.url, TOKEN, retry_timeout_seconds=5)
        w.serving_endpoints.create_and_wait("ep", config=endpoint_config("ep", entity(V1), entity(V2),
                                                                traffic=split(v1=75, v2=25)))
        w.serving_endpoints.put_ai_gateway("ep", inference_table_config=_table())
        assert w.serving_endpoints.get("ep").ai_gateway.inference_table_config.enabled
        served = [w.serving_endpoints.query("ep", dataframe_records=RECORDS).served_model_name
                  for _ in range(SENT_OK)]
        for _ in range(SENT_BAD):
            with pytest.raises(BadRequest):
                w.serving_endpoints.query("ep", dataframe_records=[{"no_such_column": 1}])
        big = w.api_client.do("POST", "/serving-endpoints/ep/invocations",
                              body={"dataframe_records": [{"image": BIG_IMAGE}], "client_request_id": "big-1"})
        assert len(big["predictions"]) == 1
        url, auth = f"{ws.url}/serving-endpoints/ep/invocations", {"Authorization": f"Bearer {TOKEN}"}
        # over 16 MB: refused on its Content-Length before a byte is read, and, sent in chunks
        # with no length, as soon as the bytes read pass the limit
        declared = requests.post(url, data=b"x" * (MAX_REQUEST_BYTES + 1), headers=auth, timeout=60)
        chunked = requests.post(url, data=(b"x" * (1024 * 1024) for _ in range(40)), headers=auth, timeout=60)
    # the workspace is stopped: whatever it answered must be in the table now
    return root, served, (declared, chunked)


def test_every_request_is_in_the_table_after_shutdown(logged):
    root, served, _ = logged
    table = DeltaTable(str(root / "tables" / "lakevision" / "ep_payload"))
    schema = json.loads(table.schema().to_json())["fields"]
    assert {f["name"]: f["type"] if isinstance(f["type"], str) else f["type"]["type"] for f in schema} == \
        AI_GATEWAY_COLUMNS
    assert [f["name"] for f in schema] == list(AI_GATEWAY_COLUMNS)  # nothing else, no endpoint or model names
    rows = table.to_pandas().sort_values("request_time")
    assert len(rows) == SENT_OK + SENT_BAD + 1
    assert list(rows["status_code"]).count(200) == SENT_OK + 1 and list(rows["status_code"]).count(400) == SENT_BAD
    assert list(rows["served_entity_id"][rows["status_code"] == 200])[:SENT_OK] == served
    ok = rows[rows["status_code"] == 200].iloc[0]
    assert json.loads(ok["request"]) == {"dataframe_records": RECORDS}
    assert "predictions" in json.loads(ok["response"])
    assert ok["execution_duration_ms"] >= 0 and ok["sampling_fraction"] == 1.0
    assert ok["requester"].startswith("token-sha256:") and TOKEN not in ok["requester"]
    assert rows["databricks_request_id"].is_unique and list(ok["logging_error_codes"]) == []
    assert ok["client_request_id"] is None


def test_a_payload_over_1_mb_is_logged_without_it(logged):
    root, _, _ = logged
    rows = DeltaTable(str(root / "tables" / "lakevision" / "ep_payload")).to_pandas()
    (big,) = rows[rows["client_request_id"] == "big-1"].itertuples()
    assert big.status_code == 200 and big.request is None and list(big.logging_error_codes) == [PAYLOAD_TOO_LARGE]
    assert json.loads(big.response)["predictions"]  # the small response is kept


def test_a_request_over_16_mb_is_413_and_not_logged(logged):
    _, _, answers = logged
    for answer in answers:
        assert answer.status_code == 413, answer.text
        assert answer.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED" and "16 MB" in answer.json()["message"]


def test_endpoint_stats_from_the_table(logged, spark, config):
    from lakevision.runtime import Runtime

    root, served, _ = logged
    rt = Runtime(config=config, spark=spark, kind="local", root=root)
    end = dt.datetime.now(dt.timezone.utc)
    start = end - dt.timedelta(hours=1)
    entities = {name_of(v): {"entity_name": "lakevision.version_model", "entity_version": v} for v in (V1, V2)}
    stats = endpoint_stats(rt, "ep", start, end, entities)
    by_entity = {s["served_entity_id"]: s for s in stats}
    assert sum(s["requests"] for s in stats) == SENT_OK + SENT_BAD + 1
    for name in set(served):
        s = by_entity[name]
        assert s["latency_p50_ms"] <= s["latency_p99_ms"] and s["throughput_rps"] == pytest.approx(s["requests"] / 3600)
        assert (s["entity_name"], s["entity_version"]) == ("lakevision.version_model", name.rsplit("-", 1)[1])
    # the bad requests are client errors, not server errors
    assert sum(s["client_error_rate"] * s["requests"] for s in stats) == pytest.approx(SENT_BAD)
    assert sum(s["error_rate"] for s in stats) == 0.0
    # a window that ends before the requests were made has none
    old = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    assert endpoint_stats(rt, "ep", old - dt.timedelta(hours=1), old) == []
    assert write_stats(rt, stats) == 0 and write_stats(rt, stats) == 1
    table = DeltaTable(rt.table(MONITORING_TABLE).path).to_pandas()
    assert len(table) == 2 * len(stats) and set(table["endpoint_name"]) == {"ep"}


def test_a_table_that_cannot_be_written_fails_no_request(registry, tmp_path, monkeypatch):  # noqa: F811
    """Its rows wait for a retry, up to the logger's bounds (here 2 rows); the rows dropped beyond
    them are counted in the endpoint's metrics."""
    blocker = tmp_path / "tables" / "lakevision"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the schema folder should be")
    monkeypatch.setattr(endpoints, "InferenceLogger", functools.partial(InferenceLogger, max_queued=2))
    with LocalWorkspace(tmp_path, TOKEN, tracking_uri=local_tracking_uri(registry)) as ws:
        w = workspace_client(ws.url, TOKEN, retry_timeout_seconds=5)
        w.serving_endpoints.create_and_wait("ep", config=endpoint_config("ep", entity(V1)))
        assert parse_rows_dropped(w.serving_endpoints.export_metrics("ep").contents.read().decode()) is None
        w.serving_endpoints.put_ai_gateway("ep", inference_table_config=_table())
        answers = [w.serving_endpoints.query("ep", dataframe_records=RECORDS).served_model_name for _ in range(5)]
        text = w.serving_endpoints.export_metrics("ep").contents.read().decode()
    assert answers == [name_of(V1)] * 5
    assert 'inference_rows_dropped_total{endpoint_name="ep"} 3.0' in text and parse_rows_dropped(text) == 3
    assert parse_endpoint_metrics(text)[name_of(V1)]["requests"] == 5  # the per-entity metrics read as before


def test_rows_held_for_a_table_that_cannot_be_written_are_bounded_in_rows_and_bytes(tmp_path):
    """Rows wait for a retry while the table cannot be written, but no more than the bounds allow:
    3,700 requests with room for 1,000 hold 1,000 and drop 2,700, and the first row written once
    the table can be says so."""
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the table's folder should be")
    logger = InferenceLogger(blocker / "t_payload", flush_seconds=60, max_queued=1000)
    big = InferenceLogger(blocker / "big_payload", flush_seconds=60, max_queued_bytes=3 * 1024 * 1024)
    try:
        for i in range(3700):
            logger.log(inference_row("m-1", 200, 1.0, b'{"dataframe_records": []}', b"{}", "r"))
            if i % 1000 == 0:
                assert logger.flush() == 0  # a failed write keeps its rows, for the next flush
        assert logger.held[0] == 1000 and logger.dropped_total == 2700
        payload = b"x" * (MAX_PAYLOAD_BYTES - 100)  # kept in the row: under the 1 MiB payload limit
        for _ in range(5):
            big.log(inference_row("m-1", 200, 1.0, payload, b"{}", "r"))
        assert big.flush() == 0
        rows, held_bytes = big.held
        assert rows == 2 and 2 * len(payload) < held_bytes <= 3 * 1024 * 1024 and big.dropped_total == 3
        blocker.unlink()
        assert logger.flush() == 1000 and logger.held == (0, 0)
    finally:
        logger.close()
        big.close()
    codes = DeltaTable(str(blocker / "t_payload")).to_pandas()["logging_error_codes"]
    assert sum(list(c) == ["ROWS_DROPPED:2700"] for c in codes) == 1


def test_bad_gateway_config_is_400_naming_the_field(registry, tmp_path):  # noqa: F811
    with LocalWorkspace(tmp_path, TOKEN, tracking_uri=local_tracking_uri(registry)) as ws:
        w = workspace_client(ws.url, TOKEN, retry_timeout_seconds=5)
        w.serving_endpoints.create_and_wait("ep", config=endpoint_config("ep", entity(V1)))
        with pytest.raises(BadRequest, match="an enabled inference table needs schema_name and table_name_prefix"):
            w.serving_endpoints.put_ai_gateway("ep", inference_table_config=AiGatewayInferenceTableConfig(enabled=True))
        with pytest.raises(BadRequest, match=r"ai_gateway.inference_table_config.schema_name"):
            w.serving_endpoints.put_ai_gateway("ep", inference_table_config=_table(schema="bad name"))


def test_oversized_payloads_are_left_out_with_a_code(tmp_path):
    logger = InferenceLogger(tmp_path / "t_payload", flush_seconds=60)
    logger.log(inference_row("m-1", 200, 3.2, b"x" * (MAX_PAYLOAD_BYTES + 1), b"{}", "r"))
    logger.log(inference_row("m-1", 200, 1.0, b"{}", b"{}", "r"))
    logger.close()  # long flush interval: only close() writes, and it writes both
    rows = DeltaTable(str(tmp_path / "t_payload")).to_pandas()
    big = rows[rows["execution_duration_ms"] == 3].iloc[0]
    assert big["request"] is None and list(big["logging_error_codes"]) == [PAYLOAD_TOO_LARGE]
    assert len(rows) == 2


def test_rows_arrive_late_and_a_clean_shutdown_still_writes_them(tmp_path):
    logger = InferenceLogger(tmp_path / "late_payload", flush_seconds=60, delay_seconds=2.0)
    try:
        logger.log(inference_row("m-1", 200, 1.0, b"{}", b"{}", "r"))
        assert logger.flush() == 0 and not (tmp_path / "late_payload").exists()  # not due yet
        time.sleep(2.1)
        assert logger.flush() == 1
        logger.log(inference_row("m-1", 200, 1.0, b"{}", b"{}", "r"))
    finally:
        logger.close()
    assert len(DeltaTable(str(tmp_path / "late_payload")).to_pandas()) == 2


def test_client_request_id_is_logged_and_kept_from_the_model():
    assert split_client_request_id(b'{"dataframe_records": [], "client_request_id": "c-7"}') == (
        "c-7", b'{"dataframe_records": []}')
    assert split_client_request_id(b'{"dataframe_records": []}') == (None, b'{"dataframe_records": []}')
    assert split_client_request_id(b'{"client_request_id": ') == (None, b'{"client_request_id": ')
