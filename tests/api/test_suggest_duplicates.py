"""POST /suggest (issue 8) and GET /duplicates (issue 5) through the app."""

from __future__ import annotations

import json

from lookalike.labels import vote
from lookalike.store import Store


def test_suggest_votes_with_neighbour_labels(client, api_store):
    with Store.open(api_store) as st:
        records = list(st.db.records())
        st.db.set_labels(
            [(r.path, ("left",) if r.path.startswith("a/") else ("right",)) for r in records]
        )
        query = next(r for r in records if r.path.startswith("a/"))
        data = st.file_path(query.path).read_bytes()
    try:
        resp = client.post("/suggest?k=5&top=2", files={"file": ("q.jpg", data, "image/jpeg")})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["neighbours"][0]["path"] == query.path
        assert body["neighbours"][0]["labels"] == ["left"]
        scores = [lab["score"] for lab in body["labels"]]
        assert 1 <= len(scores) <= 2 and all(0 <= s <= 1 for s in scores)
        assert scores == sorted(scores, reverse=True)
        assert body["labels"][0]["label"] == "left"
        expected = vote(((h["labels"], h["score"]) for h in body["neighbours"]), 2)
        assert [(lab["label"], round(lab["score"], 4)) for lab in body["labels"]] == [
            (lab, round(s, 4)) for lab, s in expected
        ]
        # labels are part of /search results too
        found = client.post("/search?k=1", files={"file": ("q.jpg", data, "image/jpeg")}).json()
        assert found["results"][0]["labels"] == ["left"]
    finally:
        with Store.open(api_store) as st:
            st.db.set_labels([(r.path, ()) for r in records])


def test_suggest_errors_match_search(client):
    bad = {"file": ("x.jpg", b"nope", "image/jpeg")}
    assert client.post("/suggest", files=bad).status_code == 400
    assert client.post("/suggest?k=0", files=bad).status_code == 422
    assert client.post("/suggest?top=0", files=bad).status_code == 422
    assert client.post("/suggest").status_code == 422


def test_duplicates_endpoint_matches_library(client, api_store):
    from lookalike.dedupe.grouping import duplicates

    resp = client.get("/duplicates?threshold=0.5")
    assert resp.status_code == 200, resp.text
    with Store.open(api_store) as st:
        assert resp.json() == json.loads(json.dumps(duplicates(st, 0.5)))
    assert resp.json()["threshold"] == 0.5
    assert client.get("/duplicates?threshold=2").status_code == 422
    assert client.get("/duplicates?keep=bogus").status_code == 422
