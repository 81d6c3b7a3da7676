"""The doctor's printed table read back into rows, for tests that run the CLI."""

import re


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of the first table in `text` (check, node, result, detail, fix); the columns
    are where the header puts them, a fix is the indented line under its row, and the
    summary line ends the table (Ray's logs may surround it)."""
    lines = text.splitlines()
    header = next(i for i, ln in enumerate(lines) if re.match(r"check\s+node\s+result\s+detail", ln))
    cols = [lines[header].index(name) for name in ("node", "result", "detail")]
    rows = []
    for line in lines[header + 1:]:
        if line.startswith("doctor:"):
            break
        if not line.strip():
            continue
        if line[:cols[2]].strip() == "" and line.strip().startswith("fix: "):
            rows[-1]["fix"] = line.strip().removeprefix("fix: ")
            continue
        rows.append({"check": line[:cols[0]].strip(), "node": line[cols[0]:cols[1]].strip(),
                     "result": line[cols[1]:cols[2]].strip(), "detail": line[cols[2]:].strip(), "fix": ""})
    return rows


def doctor_seconds(text: str) -> float:
    """The doctor's own time, from its summary line."""
    return float(re.search(r"^doctor: .* in ([\d.]+) s$", text, re.M)[1])


def comparable(row: dict[str, str]) -> tuple[str, ...]:
    """A row without what differs between two runs on the same cluster: the ports the TCP
    probes listened on and which stage Ray placed on which node."""
    return tuple(re.sub(r" stages? [\d-]+", "", re.sub(r":\d+ ", ":PORT ", v)) for v in row.values())
