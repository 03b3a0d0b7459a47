//! Seeded migration against the fake VM: the destination holds a seed (an earlier image of
//! the VM's memory); pass 1 sends only the pages that changed since, and the destination
//! ends exact whatever the seed holds — corrupted pages, pages the guest has since zeroed,
//! a seed of another VM (refused), no seed (refused), a seed the source did not ask for
//! (unused).
mod fake;
use fake::*;
use ferry_migration::engine::Options;
use ferry_migration::protocol::PAGE;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn seeded() -> Options {
    Options {
        downtime_limit: Duration::from_millis(5),
        seeded: true,
        ..Options::default()
    }
}

/// The guest writes `n` pages (every 7th from 1: pages that held data or were zero).
fn change(src: &FakeSource, n: u64) -> u64 {
    let mut mem = src.mem.lock().unwrap();
    for k in 0..n {
        let p = (1 + 7 * k) as usize % (mem.len() / PAGE);
        fill(&mut mem[p * PAGE..(p + 1) * PAGE], p as u64, 1000 + k);
    }
    n
}

#[test]
fn a_seeded_migration_sends_only_what_changed_since_the_seed_and_arrives_exact() {
    let src = FakeSource::new(8192, 16);
    let seed = src.mem.lock().unwrap().clone();
    let changed = change(&src, 300);
    let p = pair_seed(Some(seed));
    let rep = p.migrate(&src, &seeded()).unwrap();
    let (dst, r) = p.join();
    r.unwrap();
    assert_exact(&src, &dst);
    let seed_pages = 8192u64.div_ceil(3);
    assert_eq!(
        rep.seed_offered_pages, seed_pages,
        "the seed's non-zero pages"
    );
    // Pass 1 carried the changed pages and the zero pages the seed did not hold.
    let p1 = &rep.passes[0];
    assert!(p1.seeded_pages + changed >= seed_pages, "{p1:?}");
    assert!(
        p1.seeded_pages < seed_pages,
        "changed pages were compared and sent: {p1:?}"
    );
    assert!(
        p1.pages - p1.zero_pages <= changed,
        "pass 1 sent {} data pages for {changed} changed: {p1:?}",
        p1.pages - p1.zero_pages
    );
    assert_eq!(rep.seeded_pages, p1.seeded_pages);
    // Unseeded, the same VM sends every data page.
    let src2 = FakeSource::new(8192, 16);
    change(&src2, 300);
    let p2 = pair(None);
    let full = p2
        .migrate(
            &src2,
            &Options {
                seeded: false,
                ..seeded()
            },
        )
        .unwrap();
    p2.join().1.unwrap();
    let data = |r: &ferry_migration::engine::Report| r.passes[0].pages - r.passes[0].zero_pages;
    assert!(
        data(&full) > 9 * data(&rep),
        "{} vs {}",
        data(&full),
        data(&rep)
    );
}

#[test]
fn corrupted_and_stale_seed_pages_are_sent_again_never_used() {
    let mut src = FakeSource::new(4096, 0);
    src.only_written = true;
    let mut seed = src.mem.lock().unwrap().clone();
    // Flipped bytes in 40 pages of the seed (after its hashes were made they would not
    // match; here the seed itself is wrong: its hash is of the wrong content).
    for p in (0..4096).step_by(3).take(40) {
        seed[p * PAGE + 100] ^= 0xff;
    }
    // Pages the seed holds data in that the guest has since zeroed (no longer populated).
    {
        let mut mem = src.mem.lock().unwrap();
        for p in (300..4096).step_by(3).take(25) {
            mem[p * PAGE..(p + 1) * PAGE].fill(0);
        }
    }
    let p = pair_seed(Some(seed));
    let rep = p.migrate(&src, &seeded()).unwrap();
    let (dst, r) = p.join();
    r.unwrap();
    assert_exact(&src, &dst);
    let p1 = &rep.passes[0];
    assert_eq!(
        p1.pages - p1.zero_pages,
        40,
        "the 40 wrong pages went again: {p1:?}"
    );
    assert_eq!(
        p1.zero_pages, 25,
        "the zeroed pages went as zero pages: {p1:?}"
    );
}

#[test]
fn a_seed_of_another_vm_or_none_is_refused_and_the_source_runs_on() {
    for (seed, why) in [
        (
            Some(vec![0u8; 2048 * PAGE]),
            "the seed is of a VM with 2048 pages",
        ),
        (None, "no seed here"),
    ] {
        let src = FakeSource::new(4096, 8);
        let p = pair_seed(seed);
        let e = p.migrate(&src, &seeded()).unwrap_err();
        assert!(e.to_string().contains(why), "{e}");
        let e = assert_rolled_back(&src, p);
        assert!(e.to_string().contains(why), "{e}");
    }
}

#[test]
fn a_seed_is_not_used_when_the_source_does_not_ask_for_it() {
    let mut src = FakeSource::new(4096, 8);
    src.only_written = true;
    // The seed holds data everywhere; the source has most pages zero and never populated.
    let seed = vec![0x77u8; 4096 * PAGE];
    let p = pair_seed(Some(seed));
    let opts = Options {
        seeded: false,
        ..seeded()
    };
    p.migrate(&src, &opts).unwrap();
    let (dst, r) = p.join();
    r.unwrap();
    assert_exact(&src, &dst);
    assert!(dst.resumed.load(Ordering::SeqCst));
}

#[test]
fn a_seeded_migration_needs_a_first_pass() {
    let src = FakeSource::new(1024, 0);
    let p = pair_seed(Some(src.mem.lock().unwrap().clone()));
    let opts = Options {
        postcopy_after: Some(0),
        ..seeded()
    };
    let e = p.migrate(&src, &opts).unwrap_err();
    assert!(e.to_string().contains("post-copy after 0 passes"), "{e}");
}

/// The source made the seed and its dirty log names every page written since (`seed_baseline`
/// matches the destination's seed id): pass 1 sends those pages and no hashes cross; a seed
/// id it does not know takes the hash path.
#[test]
fn a_seed_this_source_made_goes_by_its_dirty_log_without_hashes() {
    for (dest_id, by_log) in [(7u64, true), (8, false)] {
        let src = FakeSource::new(8192, 16);
        let seed = src.mem.lock().unwrap().clone();
        let n = change(&src, 300);
        let changed: std::collections::BTreeSet<u64> =
            (0..n).map(|k| ((1 + 7 * k) % 8192) * PAGE as u64).collect();
        *src.seed_mark.lock().unwrap() = Some((7, changed));
        let p = pair_seed_id(seed, dest_id);
        let rep = p.migrate(&src, &seeded()).unwrap();
        let (dst, r) = p.join();
        r.unwrap();
        assert_exact(&src, &dst);
        assert_eq!(rep.seed_by_dirty_log, by_log, "{rep:?}");
        let p1 = &rep.passes[0];
        if by_log {
            assert_eq!(rep.seed_offered_pages, 0, "no hashes came");
            assert_eq!(p1.pages, n, "pass 1 sent exactly what changed: {p1:?}");
        } else {
            assert!(rep.seed_offered_pages > 0);
            assert!(p1.pages - p1.zero_pages <= n, "{p1:?}");
        }
    }
}
