"""Inference tables: the local workspace logs every request of an endpoint whose AI Gateway
inference table is on, in the background, losing nothing on a clean shutdown and failing no
request when the table cannot be written; endpoint metrics are computed from that table."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from databricks.sdk.errors import BadRequest
from databricks.sdk.service.serving import AiGatewayInferenceTableConfig
from deltalake import DeltaTable

from lakevision.monitoring.endpoint_stats import MONITORING_TABLE, endpoint_stats, write_stats
from lakevision.serving.client import workspace_client
from lakevision.serving.inference_log import (MAX_PAYLOAD_BYTES, PAYLOAD_TOO_LARGE, InferenceLogger, inference_row)
from lakevision.local.workspace.endpoints import LocalWorkspace
from lakevision.tracking import local_tracking_uri

from .test_workspace import RECORDS, TOKEN, V1, V2, entity, name_of, registry, split  # noqa: F401
from .test_workspace import config as endpoint_config

SENT_OK, SENT_BAD = 40, 6


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
    # the workspace is stopped: whatever it answered must be in the table now
    return root, served


def test_every_request_is_in_the_table_after_shutdown(logged):
    root, served = logged
    rows = DeltaTable(str(root / "tables" / "lakevision" / "ep_payload")).to_pandas().sort_values("request_time")
    assert len(rows) == SENT_OK + SENT_BAD
    assert list(rows["status_code"]).count(200) == SENT_OK and list(rows["status_code"]).count(400) == SENT_BAD
    assert list(rows["served_entity_id"][rows["status_code"] == 200]) == served
    ok = rows[rows["status_code"] == 200].iloc[0]
    assert json.loads(ok["request"]) == {"dataframe_records": RECORDS}
    assert "predictions" in json.loads(ok["response"])
    assert ok["entity_name"] == "lakevision.version_model" and ok["entity_version"] in (V1, V2)
    assert ok["endpoint_name"] == "ep" and ok["execution_duration_ms"] >= 0 and ok["sampling_fraction"] == 1.0
    assert ok["requester"].startswith("token-sha256:") and TOKEN not in ok["requester"]
    assert rows["databricks_request_id"].is_unique and list(ok["logging_error_codes"]) == []


def test_endpoint_stats_from_the_table(logged, spark, config):
    from lakevision.runtime import Runtime

    root, served = logged
    rt = Runtime(config=config, spark=spark, kind="local", root=root)
    stats = endpoint_stats(rt, "ep", window_minutes=60)
    by_entity = {s["served_entity_id"]: s for s in stats}
    assert sum(s["requests"] for s in stats) == SENT_OK + SENT_BAD
    for name in set(served):
        s = by_entity[name]
        assert s["latency_p50_ms"] <= s["latency_p99_ms"] and s["throughput_rps"] == pytest.approx(s["requests"] / 3600)
    assert sum(s["error_rate"] * s["requests"] for s in stats) == pytest.approx(SENT_BAD)
    # a window that ends before the requests were made has none
    assert endpoint_stats(rt, "ep", 60, now=dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)) == []
    assert write_stats(rt, stats) == 0 and write_stats(rt, stats) == 1
    table = DeltaTable(rt.table(MONITORING_TABLE).path).to_pandas()
    assert len(table) == 2 * len(stats) and set(table["endpoint_name"]) == {"ep"}


def test_a_table_that_cannot_be_written_fails_no_request(registry, tmp_path):  # noqa: F811
    blocker = tmp_path / "tables" / "lakevision"
    blocker.parent.mkdir(parents=True)
    blocker.write_text("a file where the schema folder should be")
    with LocalWorkspace(tmp_path, TOKEN, tracking_uri=local_tracking_uri(registry)) as ws:
        w = workspace_client(ws.url, TOKEN, retry_timeout_seconds=5)
        w.serving_endpoints.create_and_wait("ep", config=endpoint_config("ep", entity(V1)))
        w.serving_endpoints.put_ai_gateway("ep", inference_table_config=_table())
        answers = [w.serving_endpoints.query("ep", dataframe_records=RECORDS).served_model_name for _ in range(5)]
    assert answers == [name_of(V1)] * 5


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
    logger.log(inference_row("ep", "m-1", "m", "1", 200, 3.2, b"x" * (MAX_PAYLOAD_BYTES + 1), b"{}", "r"))
    logger.log(inference_row("ep", "m-1", "m", "1", 200, 1.0, b"{}", b"{}", "r"))
    logger.close()  # long flush interval: only close() writes, and it writes both
    rows = DeltaTable(str(tmp_path / "t_payload")).to_pandas()
    big = rows[rows["execution_duration_ms"] == 3].iloc[0]
    assert big["request"] is None and list(big["logging_error_codes"]) == [PAYLOAD_TOO_LARGE]
    assert len(rows) == 2
