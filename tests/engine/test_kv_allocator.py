"""KV page allocator: page tables, token positions, reference counts, migration holds, exact accounting."""

import random

import pytest

from loong_jax.engine.kv_allocator import KVAllocator, OutOfPages


def test_dense_slot_layout_and_positions():
    allocator = KVAllocator(8, page_size=4, num_instances=2)
    taken = allocator.allocate("a", 0, 6, start_position=0)  # slots 0..5 -> 2 pages
    assert taken == [0, 1] and allocator.page_table("a", 0) == (0, 1)
    assert allocator.allocate("b", 0, 3, start_position=0) == [2]
    assert allocator.allocate("a", 0, 2) == []  # fills the tail of page 1 (slots 6, 7)
    assert allocator.allocate("a", 0, 1) == [3]  # slot 8 needs a new page
    assert allocator.tokens_on("a", 0) == 9 and allocator.pages_free(0) == 4
    assert allocator.positions("a", 0) == list(range(9))
    allocator.allocate("a", 1, 5, start_position=100)  # a second share elsewhere, other positions
    assert allocator.kv_layout("a") == {0: 9, 1: 5}
    assert allocator.token_ranges("a", 1) == ((100, 5),)
    assert allocator.tokens_total("a") == 14
    allocator.check_invariants()
    assert allocator.free_request("a") == 5
    assert allocator.free_request("b") == 1
    allocator.assert_all_free()


def test_out_of_pages_changes_nothing_and_pages_needed_is_exact():
    allocator = KVAllocator([3, 3], page_size=4)
    allocator.allocate("a", 0, 10)  # 3 pages, last one has 2 free slots
    assert allocator.pages_needed("a", 0, 2) == 0 and allocator.pages_needed("a", 0, 3) == 1
    assert allocator.room_for_tokens("a", 0) == 2 and allocator.can_fit("a", 0, 2) and not allocator.can_fit("a", 0, 3)
    with pytest.raises(OutOfPages):
        allocator.allocate("a", 0, 3)
    assert allocator.tokens_on("a", 0) == 10
    allocator.check_invariants()


def test_migration_holds_source_pages_until_finished():
    allocator = KVAllocator(4, page_size=4, num_instances=2)
    allocator.allocate("a", 0, 8, start_position=0)
    allocator.allocate("a", 1, 3, start_position=8)
    ticket = allocator.begin_migration("a", 0, 1)
    assert ticket.n_tokens == 8 and ticket.dst_first_slot == 3 and ticket.src_pages == (0, 1)
    assert allocator.kv_layout("a") == {1: 11}
    assert allocator.token_ranges("a", 1) == ((8, 3), (0, 8))  # slot order, positions kept
    assert allocator.pages_free(0) == 2  # still held while the move runs
    allocator.check_invariants()
    assert allocator.finish_migration(ticket) == 2
    allocator.free_request("a")
    allocator.assert_all_free()


def test_random_workload_returns_every_page():
    rng = random.Random(0)
    allocator = KVAllocator([40, 40, 40], page_size=8)
    live, tickets = set(), []
    for step in range(3000):
        action = rng.random()
        if action < 0.5:
            request, instance, n = f"r{rng.randrange(30)}", rng.randrange(3), rng.randint(1, 40)
            if allocator.can_fit(request, instance, n):
                allocator.allocate(request, instance, n)
                live.add(request)
        elif action < 0.6 and live:
            request = rng.choice(sorted(live))
            layout = allocator.kv_layout(request)
            src, dst = rng.choice(sorted(layout)), rng.randrange(3)
            if src != dst and allocator.pages_needed(request, dst, layout[src]) <= allocator.pages_free(dst):
                tickets.append(allocator.begin_migration(request, src, dst))
        elif action < 0.7 and tickets:
            allocator.finish_migration(tickets.pop(rng.randrange(len(tickets))))
        elif live:
            request = rng.choice(sorted(live))
            allocator.free_request(request)
            live.discard(request)
        if step % 100 == 0:
            allocator.check_invariants()
    for request in live:
        allocator.free_request(request)
    for ticket in tickets:
        allocator.finish_migration(ticket)
    allocator.assert_all_free()
    assert allocator.total_pages_free == 120


def test_bad_geometry_is_rejected():
    with pytest.raises(ValueError, match="positive"):
        KVAllocator([4, 0], page_size=4)
    with pytest.raises(ValueError, match="num_instances"):
        KVAllocator(4, page_size=4)
