"""Demo and benchmark support, not needed to guard a run: the demo's aligned SmolLM2 (:mod:`.zoo`)
and the string-match refusal judge (:mod:`.judge`)."""
