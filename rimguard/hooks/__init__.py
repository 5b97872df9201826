"""The hook layer: find a model's MLPs (:mod:`.arch`), hook them (:mod:`.capture`, every module hook rimguard
registers), reduce activations on the device (:mod:`.reduce`), and read attention rows during a probe pass
(:mod:`.attention`, a wrapper installed only for that pass)."""
