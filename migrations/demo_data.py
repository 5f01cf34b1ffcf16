"""Demo data of the sample application, for `opslib seed-demo` (make seed-demo rows=N).

Users, and products across marketplaces and shops with prices as text, as the guide's application
enters them ("19.99", "5"); the same seed always gives the same rows. opslib loads them with COPY.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import sqlalchemy as sa

from opslib.seed import DemoTable, hash_password

FIRST = ["Ada", "Ben", "Chloe", "Dara", "Emil", "Farah", "Gus", "Hana", "Ivo", "Jun", "Kira", "Liam", "Mina",
         "Noor", "Omar", "Pia", "Quinn", "Rosa", "Sami", "Tess", "Uma", "Vik", "Wren", "Yara", "Zeno"]
LAST = ["Okafor", "Lindqvist", "Moreau", "Tanaka", "Silva", "Novak", "Haddad", "Kowalski", "Reyes", "Berg",
        "Costa", "Ivanova", "Murphy", "Schmidt", "Rossi", "Nguyen", "Dubois", "Jensen", "Petrov", "Alves"]
MARKETPLACES = {
    "amazon": ["northwind-goods", "blue-harbor", "casa-bella", "pixel-parts"],
    "ebay": ["retro-finds", "second-spin", "garage-gold"],
    "etsy": ["clay-and-kiln", "woolly-things", "paper-moth", "oak-and-ash"],
    "walmart": ["everyday-home", "kids-corner"],
    "mercado-libre": ["tienda-sol", "casa-norte", "tecno-sur"],
}
ADJECTIVES = ["Handmade", "Vintage", "Compact", "Wireless", "Organic", "Stainless", "Foldable", "Ceramic", "Linen",
              "Recycled", "Solar", "Waterproof"]
NOUNS = ["Mug", "Lamp", "Backpack", "Headphones", "Teapot", "Notebook", "Planter", "Blanket", "Charger", "Knife Set",
         "Desk Organizer", "Scarf", "Speaker", "Cutting Board"]
EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)
DEMO_PASSWORD = "demo-password"  # every demo user's, for trying the application; never in production


def _email(seed: int, n: int) -> str:
    return f"demo{seed}.user{n}@demo.example"


def already_loaded(conn, seed: int) -> bool:
    """Whether this seed's users are there (their emails carry the seed)."""
    return conn.execute(sa.text("SELECT 1 FROM users WHERE email = :e"), {"e": _email(seed, 1)}).first() is not None


def _users(count: int, seed: int, rng: random.Random):
    # One hash for all: Argon2 is slow on purpose, and hashing per user would take minutes for large N.
    shared = hash_password(DEMO_PASSWORD)
    for n in range(1, count + 1):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        joined = EPOCH + timedelta(minutes=rng.randrange(0, 300 * 24 * 60))
        yield (_email(seed, n), f"{first.lower()}.{last.lower()}{n}", shared, rng.random() > 0.05, False,
               joined.isoformat())


def _price(rng: random.Random) -> tuple[str, Decimal]:
    cents = int(rng.lognormvariate(7.5, 1.0)) % 100_000_00 + 99
    value = Decimal(cents) / 100
    text = str(int(value)) if cents % 100 == 0 else f"{value:.2f}"
    return text, value.quantize(Decimal("0.01"))


def _products(count: int, rng: random.Random):
    markets = sorted(MARKETPLACES)
    for _ in range(count):
        market = rng.choice(markets)
        text, value = _price(rng)
        listed = EPOCH + timedelta(minutes=rng.randrange(0, 300 * 24 * 60))
        yield (market, rng.choice(MARKETPLACES[market]), f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}", text,
               value, listed.isoformat())


def tables(rows: int, seed: int) -> list[DemoTable]:
    """``rows`` products and one user for every five of them, the same for the same ``seed``."""
    rng = random.Random(seed)
    return [
        DemoTable("users", ("email", "username", "hashed_password", "is_active", "is_admin", "created_at"),
                  _users(max(1, rows // 5), seed, rng)),
        DemoTable("products", ("marketplace", "shop_name", "title", "price", "normalized_price", "created_at"),
                  _products(rows, rng)),
    ]
