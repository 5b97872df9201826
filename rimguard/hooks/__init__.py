"""The hook layer: find a model's MLPs (:mod:`.arch`), hook them (:mod:`.capture`, every hook rimguard
registers), and reduce activations on the device (:mod:`.reduce`)."""
