"""Attacks: the base classes, the registry and the built-in attacks (registered on first use)."""
from spdbench.attacks.base import (ENTRY_POINT_GROUP, AmortizedAttack, Attack, AttackKind, UniversalAttack, attack_class, get_attack, list_attacks,
                   load_entry_points, register)

__all__ = ["Attack", "AttackKind", "UniversalAttack", "AmortizedAttack", "register", "get_attack", "list_attacks", "attack_class",
           "load_entry_points", "ENTRY_POINT_GROUP"]
