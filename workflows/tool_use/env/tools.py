"""The shop's tools: read and change a small JSON database of accounts and orders.

Runs inside a sandbox, standard library only (any Python >= 3.9)::

    python3 tools.py db.json TOOL '{"order_id": "W1001"}'     # or ARGS as "-": read from stdin

prints one JSON object, ``{"ok": true, "result": ...}`` or ``{"ok": false,
"error": ...}``, and rewrites ``db.json`` when the tool changes it. A refused
action (a rule of the shop) is an ``ok: false`` answer with exit status 0; only a
broken call (unknown tool, bad JSON) exits non-zero. The evaluator imports the
same functions to replay a scenario's expected actions.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Callable
from typing import Any

DB = dict[str, Any]

CANCEL_REASONS = ("no longer needed", "ordered by mistake")


class ToolError(Exception):
    """The shop refuses the action; the message is shown to the assistant."""


def _order(db: DB, order_id: Any) -> dict[str, Any]:
    order = db["orders"].get(str(order_id).strip().lstrip("#"))
    if order is None:
        raise ToolError(f"no order with id {order_id!r}")
    return order


def _account(db: DB, account_id: Any) -> dict[str, Any]:
    account = db["accounts"].get(str(account_id).strip())
    if account is None:
        raise ToolError(f"no account with id {account_id!r}")
    return account


def _money(value: Any, what: str) -> float:
    try:
        amount = round(float(value), 2)
    except (TypeError, ValueError):
        raise ToolError(f"{what} must be a number, got {value!r}") from None
    if amount <= 0:
        raise ToolError(f"{what} must be positive")
    return amount


def find_account_by_email(db: DB, email: str) -> Any:
    wanted = str(email).strip().lower()
    for account_id, acc in db["accounts"].items():
        if acc["email"].lower() == wanted:
            return {"account_id": account_id, "name": acc["name"]}
    raise ToolError(f"no account with email {email!r}")


def get_account(db: DB, account_id: str) -> Any:
    acc = _account(db, account_id)
    return {"account_id": account_id, **acc}


def get_order(db: DB, order_id: str) -> Any:
    order_id = str(order_id).strip().lstrip("#")
    return {"order_id": order_id, **_order(db, order_id)}


def cancel_order(db: DB, order_id: str, reason: str) -> Any:
    order = _order(db, order_id)
    if order["status"] != "pending":
        raise ToolError(f"order {order_id} is {order['status']}; only pending orders can be cancelled")
    if reason not in CANCEL_REASONS:
        raise ToolError(f"reason must be one of {', '.join(repr(r) for r in CANCEL_REASONS)}")
    order["status"] = "cancelled"
    order["cancel_reason"] = reason
    return {"order_id": order_id, "status": "cancelled", "refund": order["total"]}


def update_order_address(db: DB, order_id: str, street: str, city: str, zip: str) -> Any:
    order = _order(db, order_id)
    if order["status"] != "pending":
        raise ToolError(f"order {order_id} is {order['status']}; only pending orders can change address")
    if not all(isinstance(v, str) and v.strip() for v in (street, city, zip)):
        raise ToolError("street, city and zip are all required")
    order["address"] = {"street": street.strip(), "city": city.strip(), "zip": zip.strip()}
    return {"order_id": order_id, "address": order["address"]}


def refund_order(db: DB, order_id: str, amount: Any, reason: str) -> Any:
    order = _order(db, order_id)
    if order["status"] != "delivered":
        raise ToolError(f"order {order_id} is {order['status']}; only delivered orders can be refunded")
    value = _money(amount, "amount")
    left = round(order["total"] - order.get("refunded", 0.0), 2)
    if value > left:
        raise ToolError(f"amount {value:.2f} is more than the {left:.2f} left to refund on order {order_id}")
    if not str(reason).strip():
        raise ToolError("a reason is required")
    order["refunded"] = round(order.get("refunded", 0.0) + value, 2)
    order.setdefault("refunds", []).append({"amount": value, "reason": str(reason).strip()})
    return {"order_id": order_id, "refunded": order["refunded"]}


def update_account_email(db: DB, account_id: str, new_email: str) -> Any:
    acc = _account(db, account_id)
    email = str(new_email).strip()
    if "@" not in email or " " in email:
        raise ToolError(f"{new_email!r} is not an email address")
    if any(a["email"].lower() == email.lower() for a in db["accounts"].values()):
        raise ToolError(f"{email} is already used by an account")
    acc["email"] = email
    return {"account_id": account_id, "email": email}


def transfer_to_human(db: DB, summary: str) -> Any:
    return {"transferred": True, "summary": str(summary)}


IMPLEMENTATIONS: dict[str, Callable[..., Any]] = {
    f.__name__: f
    for f in (find_account_by_email, get_account, get_order, cancel_order, update_order_address, refund_order, update_account_email, transfer_to_human)
}
WRITES = {"cancel_order", "update_order_address", "refund_order", "update_account_email"}


def _fn(name: str, description: str, props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": {"type": "object", "properties": props, "required": required}},
    }


_S = {"type": "string"}
SCHEMAS: list[dict[str, Any]] = [
    _fn("find_account_by_email", "Find a customer's account id by their email address.", {"email": _S}, ["email"]),
    _fn("get_account", "Account details: name, email, address and order ids.", {"account_id": _S}, ["account_id"]),
    _fn("get_order", "Order details: items, total, status, address, refunds.", {"order_id": _S}, ["order_id"]),
    _fn(
        "cancel_order",
        "Cancel a pending order. reason: 'no longer needed' or 'ordered by mistake'.",
        {"order_id": _S, "reason": {"type": "string", "enum": list(CANCEL_REASONS)}},
        ["order_id", "reason"],
    ),
    _fn(
        "update_order_address",
        "Change the shipping address of a pending order.",
        {"order_id": _S, "street": _S, "city": _S, "zip": _S},
        ["order_id", "street", "city", "zip"],
    ),
    _fn(
        "refund_order",
        "Refund part or all of a delivered order.",
        {"order_id": _S, "amount": {"type": "number"}, "reason": _S},
        ["order_id", "amount", "reason"],
    ),
    _fn("update_account_email", "Change the email address of an account.", {"account_id": _S, "new_email": _S}, ["account_id", "new_email"]),
    _fn("transfer_to_human", "Hand the conversation to a human agent when the request is outside the policy.", {"summary": _S}, ["summary"]),
]


def call(db: DB, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """Apply tool ``name`` to ``db`` (in place); the JSON answer the assistant sees."""
    fn = IMPLEMENTATIONS.get(name)
    if fn is None:
        return {"ok": False, "error": f"unknown tool {name!r}"}
    if not isinstance(arguments, dict):
        return {"ok": False, "error": "arguments must be a JSON object"}
    try:
        return {"ok": True, "result": fn(db, **arguments)}
    except ToolError as exc:
        return {"ok": False, "error": str(exc)}
    except TypeError as exc:  # missing or unexpected argument names
        return {"ok": False, "error": f"bad arguments for {name}: {exc}"}


def replay(db: DB, actions: list[dict[str, Any]]) -> DB:
    """A copy of ``db`` after ``actions`` ([{"name", "arguments"}]): a scenario's expected state."""
    state = copy.deepcopy(db)
    for action in actions:
        answer = call(state, action["name"], action.get("arguments", {}))
        if not answer["ok"]:
            raise ValueError(f"expected action {action} fails: {answer['error']}")
    return state


def reward_view(db: DB) -> DB:
    """The parts of the database a scenario's outcome is judged on (free-text reasons left out)."""
    return {
        "accounts": {k: {"email": a["email"], "address": a["address"]} for k, a in sorted(db["accounts"].items())},
        "orders": {
            k: {"status": o["status"], "cancel_reason": o.get("cancel_reason"), "address": o["address"], "refunded": round(o.get("refunded", 0.0), 2)}
            for k, o in sorted(db["orders"].items())
        },
    }


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: tools.py DB_JSON TOOL ARGS_JSON", file=sys.stderr)
        return 2
    db_path, name, raw_args = argv[1], argv[2], argv[3]
    if raw_args == "-":  # long arguments: no command-line length limit on stdin
        raw_args = sys.stdin.read()
    try:
        arguments = json.loads(raw_args)
    except ValueError as exc:
        print(json.dumps({"ok": False, "error": f"arguments are not JSON: {exc}"}))
        return 0
    with open(db_path) as fh:
        db = json.load(fh)
    answer = call(db, name, arguments)
    if answer["ok"] and name in WRITES:
        tmp = db_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(db, fh, indent=1, sort_keys=True)
        os.replace(tmp, db_path)  # a killed call leaves the old database, never half of one
    print(json.dumps(answer, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
