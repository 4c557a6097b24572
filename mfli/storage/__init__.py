"""LMDB storage layouts and their readers: the index (written by ``mfli index``) and the users store
(written by the learner). Writers and readers share these modules so the byte layout lives in one place."""
