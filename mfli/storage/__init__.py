"""The LMDB stores and their formats: the index (:mod:`mfli.storage.index`, written by ``mfli index``)
and the users store (:mod:`mfli.storage.users_lmdb`, written by the learner). Each format has one
owner module (or package) holding its writer and its readers, so the byte layout lives in one place."""
