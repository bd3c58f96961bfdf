"""The fixed prompt set of `sluice bench speculative`: chat requests whose answers copy from
their prompt to a different degree, and one open question whose answer copies nothing.

What an answer copies is the model's doing, so each prompt is chosen by what the default model
(SmolLM2-135M-Instruct, greedy) answers: it returns the class of `code_edit` line for line (the
copy-heavy code edit), while it rewrites `code_rename`'s longer function into a line or two of its
own (an edit that copies little beyond the signature)."""

from __future__ import annotations

_INVENTORY = """def summarize_inventory(items, threshold):
    totals = {}
    low_stock = []
    for item in items:
        name = item["name"]
        count = item["count"]
        price = item["price"]
        totals[name] = totals.get(name, 0) + count * price
        if count < threshold:
            low_stock.append(name)
    report = []
    for name, value in sorted(totals.items()):
        report.append(f"{name}: {value:.2f}")
    if low_stock:
        report.append("low stock: " + ", ".join(sorted(low_stock)))
    return "\\n".join(report)
"""

_POINT_CLASS = """class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def add(self, other):
        return Point(self.x + other.x, self.y + other.y)

    def subtract(self, other):
        return Point(self.x - other.x, self.y - other.y)

    def scale(self, factor):
        return Point(self.x * factor, self.y * factor)

    def dot(self, other):
        return self.x * other.x + self.y * other.y

    def length(self):
        return (self.x ** 2 + self.y ** 2) ** 0.5

    def __repr__(self):
        return f"Point({self.x}, {self.y})"
"""

_PASSAGE = (
    "The lighthouse at Carrow Point was built in 1871 after three ships were lost on the reef in "
    "a single winter. Its first keeper, Margaret Hale, kept a log for thirty-one years, and in it "
    'she wrote that "the light is only as faithful as the hands that trim the wick." The tower '
    "was automated in 1964, and the keeper's cottage became a small museum. Visitors can still "
    "read the log, in which Hale recorded storms, shipwrecks and the arrival of the first steam "
    'ferry, which she called "a kettle with ambitions." In 1998 a storm cracked the lantern '
    "room, and the town raised the money to repair it within a month. Today the light still "
    "turns every night, and the museum's sign quotes Hale once more: \"Keep the light, and the "
    'light will keep you."'
)

WORKLOADS: dict[str, str] = {
    "code_edit": (
        "Add a docstring to this Python class and return the whole class, otherwise "
        f"unchanged:\n\n```python\n{_POINT_CLASS}```"
    ),
    "code_rename": (
        "Rename the parameter `items` to `records` and the variable `totals` to `values` in "
        f"this Python function and return the whole function:\n\n```python\n{_INVENTORY}```"
    ),
    "summary_quotes": (
        "Summarise this passage in a few sentences, quoting its most memorable phrases "
        f"exactly:\n\n{_PASSAGE}"
    ),
    "open_chat": "What are some good ways to stay focused when working from home?",
}
