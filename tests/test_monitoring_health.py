"""The endpoint-health verdict the monitor job fails on."""

from lakevision.monitoring.health import judge


def _status(ready="READY", update="NOT_UPDATING", **entities):
    return {"name": "ep", "state": {"ready": ready, "config_update": update},
            "metrics": {"per_entity": entities}}


def test_healthy_endpoint_has_no_problems():
    assert judge(_status(m1={"requests": 100, "error_rate": 0.01, "latency_p99_ms": 80.0}), 0.05, 100.0) == []


def test_each_bound_is_reported():
    status = _status("NOT_READY", "UPDATE_FAILED", m1={"requests": 10, "error_rate": 0.2, "latency_p99_ms": 150.0})
    assert judge(status, 0.05, 100.0) == [
        "endpoint ep is NOT_READY", "the last config update of ep failed",
        "m1: server error rate 0.200 > 0.05", "m1: p99 latency 150.0 ms > 100 ms"]


def test_no_traffic_is_not_an_error_and_latency_unjudged_without_bound():
    status = _status(m1={"requests": 0, "error_rate": 0.0, "latency_p99_ms": None},
                     m2={"requests": 5, "error_rate": 0.0, "latency_p99_ms": 9000.0})
    assert judge(status, 0.05, None) == []
