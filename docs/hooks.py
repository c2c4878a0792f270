"""MkDocs hook: the argument tables of docs/arguments.md, written from the table of terms in yolo_fgd/cfg/distill.py
(so the docs and `yolo-fgd train help` read one source)."""

from yolo_fgd.cfg.distill import RENAMED, TERM_TABLE, arg_name, argument_rows


def arguments_table() -> str:
    rows = ["| argument | default (preset `yolo`) | meaning | term |", "|---|---|---|---|"]
    rows += [f"| `{a}` | {d} | {m.replace('|', '&#124;')} | {t} |" for a, d, m, t in argument_rows()]
    return "\n".join(rows)


def terms_table() -> str:
    rows = ["| term | arguments | what it is | trainable modules | columns |", "|---|---|---|---|---|"]
    rows += [f"| {t['name']} | {', '.join(f'`{arg_name(k)}`' for k in t['keys'])} | {t['what']} | {t['modules']} | "
             f"{t['columns']} |" for t in TERM_TABLE]
    return "\n".join(rows)


def on_page_markdown(markdown, page, config, files):
    if page.file.src_uri != "arguments.md":
        return markdown
    renamed = ", ".join(f"`{a}` → `{b}`" for a, b in RENAMED.items())
    return (markdown.replace("<!-- arguments -->", arguments_table()).replace("<!-- terms -->", terms_table())
            .replace("<!-- renamed -->", renamed))
