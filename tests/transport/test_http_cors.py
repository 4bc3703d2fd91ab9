"""A browser page calling the HTTP port: CORS for the origins --allowed-origins lists (the Fetch
standard's checks: the preflight's answer allows the origin, method and headers the page asked
for; every answer, errors too, names the origin so the page can read it), and none for others."""

import httpx
import pytest

from tests.servers import RunningServer
from tests.transport.test_http_server import exchange, h11_request, read_responses, speech_json

APP = "https://app.example"
TOKEN = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def api():
    import csmstream

    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=1), http_port=0, auth_token="s3cret",
                       allowed_origins=[APP], warmup=False).start()
    yield rs
    rs.stop()


def preflight(url, origin, method="POST", headers="authorization, content-type"):
    return httpx.options(url, headers={"Origin": origin, "Access-Control-Request-Method": method,
                                       "Access-Control-Request-Headers": headers})


def test_the_preflight_of_an_allowed_origin_is_answered_without_credentials(api):
    r = preflight(api.srv.speech_url, APP)  # (a browser sends no Authorization with it)
    assert r.status_code == 204 and r.content == b"" and "content-length" not in r.headers
    assert r.headers["access-control-allow-origin"] == APP and r.headers["vary"] == "Origin"
    assert "POST" in [m.strip() for m in r.headers["access-control-allow-methods"].split(",")]
    assert r.headers["access-control-allow-headers"] == "authorization, content-type"
    assert int(r.headers["access-control-max-age"]) > 0


def test_answers_to_an_allowed_origin_name_it_errors_too(api):
    url = api.srv.speech_url
    with httpx.stream("POST", url, content=speech_json(max_audio_ms=200, response_format="pcm"),
                      headers={**TOKEN, "Origin": APP}) as r:
        audio = r.read()
        assert r.status_code == 200 and len(audio) == 200 * 48
        assert r.headers["access-control-allow-origin"] == APP
        exposed = [h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")]
        assert "x-request-id" in exposed and r.headers["x-request-id"]  # the page may read its request id
    r = httpx.post(url, content=speech_json(), headers={"Origin": APP})  # no token: the page reads why
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == APP
    assert r.json()["error"]["code"] == "unauthorized"
    r = httpx.post(url, content=b"{", headers={**TOKEN, "Origin": APP})
    assert r.status_code == 400 and r.headers["access-control-allow-origin"] == APP
    r = httpx.get(url.replace("/v1/audio/speech", "/healthz"), headers={"Origin": APP})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP


def test_another_origin_is_refused_and_told_how_to_be_let_in(api):
    r = preflight(api.srv.speech_url, "https://evil.example")
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    assert "serve --allowed-origins lists the origins that may" in r.json()["error"]["message"]
    r = httpx.post(api.srv.speech_url, content=speech_json(), headers={**TOKEN, "Origin": "https://evil.example"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers


def test_options_without_an_origin_says_what_the_port_answers_and_the_connection_serves_on(api):
    raw = exchange(api.srv.http.port, h11_request("OPTIONS", "/v1/audio/speech") +
                   h11_request("GET", "/healthz", headers=[("Connection", "close")]))
    (s1, h1, b1, _), (s2, _, _, _) = read_responses(raw, ["OPTIONS", "GET"])
    assert s1 == 204 and b1 == b"" and h1["allow"] == "GET, HEAD, POST, OPTIONS" and s2 == 200


def test_with_no_allowed_origins_no_page_elsewhere_may_read_the_answers():
    import csmstream

    rs = RunningServer(csmstream.load("tiny", device="cpu", max_streams=1), http_port=0, warmup=False).start()
    try:
        r = httpx.post(rs.srv.speech_url, content=speech_json(max_audio_ms=100), headers={"Origin": APP})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert preflight(rs.srv.speech_url, APP).status_code == 403
    finally:
        rs.stop()
