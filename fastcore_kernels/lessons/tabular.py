"""Tabular data and models (lesson 4: Adult income; lesson 6: Rossmann sales).

`TabularProcs` is fastai's preprocessing, fitted on the training rows and applied unchanged to the validation rows:
categorify (codes by sorted value, 0 = '#na#' for missing or unseen), fill missing continuous values with the
training median (plus a `<name>_na` flag column), normalise with the training mean and std.

`TabularModel`: one embedding per categorical column (fastai's size rule), embedding dropout, batch norm of the
continuous columns, then Linear -> BatchNorm1d -> ReLU -> Dropout blocks and a linear head (sigmoid-scaled into
`y_range` for regression). Batch norm sits before the ReLU so that `fuse` puts the fused BN-ReLU kernel there, and the
embeddings run on the fused embedding kernels.

Data without a network: `write_adult` and `write_rossmann` generate deterministic, rule-based tables with learnable
structure, in the real files' formats (Adult's adult.csv; Rossmann's train.csv + store.csv), and the lessons read them
back with the same loaders a real download goes through. They are synthetic: documented as such in the README.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import random
from pathlib import Path

import torch
from torch import nn

MISSING = {"", "?", "NA", "NaN", "nan", "None"}


def read_csv(path: str | Path) -> dict[str, list[str]]:
    """Columns of a CSV with a header row, as lists of stripped strings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a CSV file at {path}")
    with path.open(newline="") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ValueError(f"{path} is empty") from None
        rows = [r for r in reader if r]
    for i, r in enumerate(rows):
        if len(r) != len(header):
            raise ValueError(f"{path}: row {i + 2} has {len(r)} fields, the header has {len(header)}")
    if not rows:
        raise ValueError(f"{path} has a header but no rows")
    return {h: [r[j].strip() for r in rows] for j, h in enumerate(header)}


def take(cols: dict[str, list[str]], idx) -> dict[str, list[str]]:
    return {k: [v[i] for i in idx] for k, v in cols.items()}


def _float(s: str) -> float:
    return math.nan if s in MISSING else float(s)


class TabularProcs:
    """Categorify, FillMissing and Normalize, fitted on the training columns."""

    def __init__(self, cat_names: list[str], cont_names: list[str], y_name: str, y_kind: str = "category",
                 log_y: bool = False):
        if y_kind not in ("category", "float"):
            raise ValueError(f"y_kind must be 'category' or 'float', got {y_kind!r}")
        self.cat_names, self.cont_names, self.y_name = list(cat_names), list(cont_names), y_name
        self.y_kind, self.log_y = y_kind, log_y

    def fit(self, cols: dict[str, list[str]]) -> "TabularProcs":
        missing = [c for c in self.cat_names + self.cont_names + [self.y_name] if c not in cols]
        if missing:
            raise KeyError(f"columns {missing} are not in the table (it has {list(cols)})")
        self.medians, self.na_flags = {}, []
        conts = {}
        for c in self.cont_names:
            vals = [_float(s) for s in cols[c]]
            present = sorted(v for v in vals if not math.isnan(v))
            if not present:
                raise ValueError(f"continuous column {c!r} has no values")
            self.medians[c] = present[len(present) // 2]
            if len(present) < len(vals):
                self.na_flags.append(c)
            conts[c] = torch.tensor([self.medians[c] if math.isnan(v) else v for v in vals], dtype=torch.float64)
        self.means = {c: float(t.mean()) for c, t in conts.items()}
        self.stds = {c: float(t.std()) or 1.0 for c, t in conts.items()}
        self.classes = {c: ["#na#"] + sorted({s for s in cols[c] if s not in MISSING}) for c in self.cat_names}
        for c in self.na_flags:
            self.classes[f"{c}_na"] = ["#na#", "False", "True"]
        if self.y_kind == "category":
            self.y_classes = sorted(set(cols[self.y_name]))
        return self

    @property
    def all_cat_names(self) -> list[str]:
        return self.cat_names + [f"{c}_na" for c in self.na_flags]

    def cardinalities(self) -> list[int]:
        return [len(self.classes[c]) for c in self.all_cat_names]

    def __call__(self, cols: dict[str, list[str]]):
        """(x_cat int64 (n, n_cat), x_cont float32 (n, n_cont), y) for columns in the fitted table's layout."""
        cat, cont = [], []
        for c in self.cat_names:
            stoi = {s: i for i, s in enumerate(self.classes[c])}
            cat.append([stoi.get(s, 0) for s in cols[c]])
        for c in self.na_flags:
            cat.append([2 if s in MISSING else 1 for s in cols[c]])
        for c in self.cont_names:
            vals = [_float(s) for s in cols[c]]
            cont.append([((self.medians[c] if math.isnan(v) else v) - self.means[c]) / self.stds[c] for v in vals])
        n = len(cols[self.y_name])
        x_cat = torch.tensor(cat, dtype=torch.long).t().contiguous() if cat else torch.zeros(n, 0, dtype=torch.long)
        x_cont = torch.tensor(cont, dtype=torch.float32).t().contiguous() if cont else torch.zeros(n, 0)
        if self.y_kind == "category":
            stoi = {s: i for i, s in enumerate(self.y_classes)}
            unknown = sorted({s for s in cols[self.y_name] if s not in stoi})
            if unknown:
                raise ValueError(f"target {self.y_name!r} has values {unknown[:5]} the training rows lack")
            y = torch.tensor([stoi[s] for s in cols[self.y_name]], dtype=torch.long)
        else:
            y = torch.tensor([float(s) for s in cols[self.y_name]], dtype=torch.float32)
            y = (y.log() if self.log_y else y)[:, None]
        return x_cat, x_cont, y


def emb_size(n_cat: int) -> int:
    """fastai's rule of thumb for an embedding's width."""
    return min(600, round(1.6 * n_cat**0.56))


class TabularModel(nn.Module):
    def __init__(self, cardinalities: list[int], n_cont: int, out_sz: int, layers=(200, 100), ps=None,
                 embed_p: float = 0.0, y_range: tuple[float, float] | None = None):
        super().__init__()
        ps = [0.0] * len(layers) if ps is None else list(ps)
        if len(ps) != len(layers):
            raise ValueError(f"{len(ps)} dropout probabilities for {len(layers)} layers")
        self.embeds = nn.ModuleList(nn.Embedding(n, emb_size(n)) for n in cardinalities)
        self.emb_drop = nn.Dropout(embed_p)
        self.bn_cont = nn.BatchNorm1d(n_cont) if n_cont else None
        sizes = [sum(e.embedding_dim for e in self.embeds) + n_cont, *layers]
        blocks = []
        for n_in, n_out, p in zip(sizes[:-1], sizes[1:], ps):
            blocks += [nn.Linear(n_in, n_out, bias=False), nn.BatchNorm1d(n_out), nn.ReLU(inplace=True)]
            if p:
                blocks.append(nn.Dropout(p))
        blocks.append(nn.Linear(sizes[-1], out_sz))
        self.layers = nn.Sequential(*blocks)
        self.y_range = y_range

    def forward(self, x_cat, x_cont):
        parts = []
        if self.embeds:
            parts.append(self.emb_drop(torch.cat([e(x_cat[:, i]) for i, e in enumerate(self.embeds)], 1)))
        if self.bn_cont is not None:
            parts.append(self.bn_cont(x_cont))
        x = self.layers(torch.cat(parts, 1))
        if self.y_range is not None:
            lo, hi = self.y_range
            x = torch.sigmoid(x) * (hi - lo) + lo
        return x


# --- Adult-style income table (lesson 4) ------------------------------------------------------------------------
ADULT_COLUMNS = ["age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
                 "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week", "native-country",
                 "salary"]
_EDUCATION = ["Preschool", "1st-4th", "5th-6th", "7th-8th", "9th", "10th", "11th", "12th", "HS-grad",
              "Some-college", "Assoc-voc", "Assoc-acdm", "Bachelors", "Masters", "Prof-school", "Doctorate"]
_WORKCLASS = ["Private", "Self-emp-not-inc", "Self-emp-inc", "Federal-gov", "Local-gov", "State-gov"]
_OCCUPATION = {"Exec-managerial": 1.0, "Prof-specialty": 0.9, "Tech-support": 0.4, "Sales": 0.3,
               "Craft-repair": 0.0, "Adm-clerical": -0.2, "Transport-moving": -0.2, "Machine-op-inspct": -0.4,
               "Other-service": -1.2, "Handlers-cleaners": -1.0, "Farming-fishing": -0.8, "Protective-serv": 0.3}
_MARITAL = {"Married-civ-spouse": 1.3, "Never-married": -1.0, "Divorced": -0.4, "Separated": -0.6, "Widowed": -0.5}
_RACE = ["White", "Black", "Asian-Pac-Islander", "Amer-Indian-Eskimo", "Other"]


def write_adult(path: str | Path, n: int = 20000, seed: int = 0) -> Path:
    """A synthetic table in adult.csv's format. Income >= 50k follows a fixed logistic rule of education, age (peaking
    in the 40s-50s), hours, occupation, marital status and capital gain, plus noise; about a quarter of the rows earn
    >= 50k, as in the census data. Some workclass/occupation values are '?' and some ages are missing."""
    rng = random.Random(seed)
    pick, rand = rng.choice, rng.random
    occupations, maritals = list(_OCCUPATION), list(_MARITAL)
    rows = []
    for _ in range(n):
        age = 17 + int(60 * rand() ** 1.3)
        edu = min(15, max(0, int(8 + 3.0 * rng.gauss(0, 1))))
        occ, mar, wc = pick(occupations), pick(maritals), pick(_WORKCLASS)
        sex = "Male" if rand() < 0.67 else "Female"
        rel = ("Husband" if sex == "Male" else "Wife") if mar == "Married-civ-spouse" else pick(
            ["Not-in-family", "Own-child", "Unmarried", "Other-relative"])
        hours = max(1, min(99, int(40 + 12 * rng.gauss(0, 1))))
        gain = int(15000 * rand()) if rand() < 0.08 else 0
        logit = (0.55 * (edu - 9) + 2.2 * math.exp(-((age - 48) / 14) ** 2) - 1.0 + 0.045 * (hours - 40)
                 + _OCCUPATION[occ] + _MARITAL[mar] + (2.5 if gain > 5000 else 0) - 0.6
                 + 0.8 * rng.gauss(0, 1))
        rich = logit > 0
        rows.append([
            "" if rand() < 0.02 else str(age), "?" if rand() < 0.05 else wc, str(int(50000 + 300000 * rand())),
            _EDUCATION[edu], str(edu + 1), mar, "?" if rand() < 0.05 else occ, rel, pick(_RACE), sex,
            str(gain), "0", str(hours), "United-States", ">=50k" if rich else "<50k"])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(ADULT_COLUMNS)
        w.writerows(rows)
    return path


# --- Rossmann-style store sales (lesson 6) -----------------------------------------------------------------------
def write_rossmann(folder: str | Path, n_stores: int = 120, days: int = 700, seed: int = 0) -> Path:
    """Synthetic train.csv + store.csv in Rossmann's formats. Sales are a product of a store's base level, its type and
    assortment, the day of the week, promotions, the month (a December peak), school holidays and the distance to a
    competitor, times log-normal noise; stores close on Sundays and state holidays (Open = 0, Sales = 0)."""
    rng = random.Random(seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stores = []
    for s in range(1, n_stores + 1):
        stype = rng.choice("abcd")
        assort = rng.choice("abc")
        dist = "" if rng.random() < 0.05 else str(int(50 + 20000 * rng.random() ** 2))
        base = 5000 * math.exp(0.35 * rng.gauss(0, 1))
        stores.append((s, stype, assort, dist, base))
    with (folder / "store.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Store", "StoreType", "Assortment", "CompetitionDistance"])
        w.writerows([s[:4] for s in stores])
    dow_factor = [1.25, 1.05, 1.0, 0.98, 1.08, 0.9, 0.3]
    type_factor = {"a": 1.0, "b": 1.6, "c": 0.95, "d": 1.05}
    assort_factor = {"a": 1.0, "b": 0.8, "c": 1.15}
    start = dt.date(2013, 1, 1)
    holidays = {start + dt.timedelta(d) for d in range(days) if rng.random() < 0.03}
    rows = []
    for d in range(days):
        day = start + dt.timedelta(d)
        dow = day.isoweekday()
        promo = int(day.isocalendar()[1] % 2 == 0 and dow <= 5)
        school = int(day.month in (7, 8) or rng.random() < 0.05)
        state_hol = "a" if day in holidays else "0"
        season = 1.0 + 0.25 * math.exp(-((day.month - 12) % 12) ** 2 / 2) + 0.05 * math.sin(day.day / 5)
        for s, stype, assort, dist, base in stores:
            open_ = int(dow != 7 and state_hol == "0")
            sales = 0
            if open_:
                comp = 0.85 if dist and int(dist) < 1000 else 1.0
                noise = math.exp(0.1 * rng.gauss(0, 1))
                sales = int(base * dow_factor[dow - 1] * (1.3 if promo else 1.0) * season * type_factor[stype]
                            * assort_factor[assort] * comp * (1.05 if school else 1.0) * noise)
            rows.append([s, dow, day.isoformat(), sales, int(sales / 9.5), open_, promo, state_hol, school])
    with (folder / "train.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Store", "DayOfWeek", "Date", "Sales", "Customers", "Open", "Promo", "StateHoliday",
                    "SchoolHoliday"])
        w.writerows(rows)
    return folder


def read_rossmann(folder: str | Path) -> dict[str, list[str]]:
    """Rossmann's train.csv joined with store.csv on Store (when present), open days with sales only, the date split
    into Year/Month/Week/Day (fastai's add_datepart), rows sorted by date."""
    folder = Path(folder)
    cols = read_csv(folder / "train.csv")
    for c in ("Store", "Date", "Sales"):
        if c not in cols:
            raise KeyError(f"{folder / 'train.csv'} has no {c!r} column")
    keep = [i for i, s in enumerate(cols["Sales"]) if _float(s) > 0 and cols.get("Open", ["1"] * len(s))[i] != "0"]
    keep.sort(key=lambda i: cols["Date"][i])
    cols = take(cols, keep)
    if (folder / "store.csv").is_file():
        store = read_csv(folder / "store.csv")
        by_id = {sid: i for i, sid in enumerate(store["Store"])}
        for c in store:
            if c != "Store":
                cols[c] = [store[c][by_id[sid]] if sid in by_id else "" for sid in cols["Store"]]
    dates = [dt.date.fromisoformat(d) for d in cols["Date"]]
    cols["Year"] = [str(d.year) for d in dates]
    cols["Month"] = [str(d.month) for d in dates]
    cols["Week"] = [str(d.isocalendar()[1]) for d in dates]
    cols["Day"] = [str(d.day) for d in dates]
    return cols
