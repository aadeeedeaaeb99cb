import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from meshnode.observability import logging as node_logging


@pytest.fixture(autouse=True)
def root_logger() -> Iterator[None]:
    """configure() replaces the root logger's handlers: give pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_the_trace_and_span_of_the_request() -> None:
    out = io.StringIO()
    node_logging.configure("json", logging.INFO, out)
    tracer = TracerProvider(shutdown_on_exit=False).get_tracer("test")
    log = logging.getLogger("meshnode.test")

    with tracer.start_as_current_span("request") as span:
        log.info("serving %s", "m")
    log.warning("between requests")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")

    inside, outside, failed = (json.loads(line) for line in out.getvalue().splitlines())
    context = span.get_span_context()
    assert inside == {"time": inside["time"], "level": "INFO", "logger": "meshnode.test", "message": "serving m",
                      "trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}
    assert "trace_id" not in outside and outside["level"] == "WARNING"
    assert "ValueError: boom" in failed["exception"]


def test_text_lines_add_the_ids_only_inside_a_trace() -> None:
    out = io.StringIO()
    node_logging.configure("text", logging.INFO, out)
    tracer = TracerProvider(shutdown_on_exit=False).get_tracer("test")

    with tracer.start_as_current_span("request") as span:
        logging.getLogger("x").info("inside")
    logging.getLogger("x").info("outside")

    inside, outside = out.getvalue().splitlines()
    assert inside.endswith(f"x: inside trace_id={format(span.get_span_context().trace_id, '032x')} "
                           f"span_id={format(span.get_span_context().span_id, '016x')}")
    assert outside.endswith("INFO x: outside")


def test_the_level_moves_a_step_at_a_time_while_running() -> None:
    out = io.StringIO()
    node_logging.configure("text", logging.INFO, out)
    debug = logging.getLogger("meshnode.x").debug

    debug("hidden")
    assert node_logging.more_verbose() == logging.DEBUG
    debug("shown")
    assert node_logging.more_verbose() == logging.DEBUG  # the most verbose already
    assert node_logging.less_verbose() == logging.INFO
    assert node_logging.less_verbose() == logging.WARNING
    assert [node_logging.less_verbose() for _ in range(3)] == [logging.ERROR] * 3

    text = out.getvalue()
    assert "hidden" not in text and "shown" in text
    assert text.count("log level now") == 7  # every change is said, at a level still shown


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        node_logging.configure("xml")
