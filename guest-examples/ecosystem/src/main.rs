//! Popular crates.io crates, unmodified, in a guest: `rand` (getrandom 0.3), `getrandom`
//! 0.2, `uuid` v4 (getrandom 0.4), `hashbrown` with its default hasher, `serde_json`,
//! `log` through `pvrun::log`, `chrono`, `libm`/`num-traits`, and `critical-section`.
//!
//! Every check prints `ok NAME: DETAILS` or `FAIL NAME: DETAILS`; the exit code is the
//! number of failures. The values printed (random numbers, UUIDs, the date) are what the
//! host-side test compares between boots.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use pvrun::println;

pvrun::entry!(main);

/// Counts failed checks.
struct Checks {
    failed: i32,
}

impl Checks {
    fn check(&mut self, name: &str, ok: bool, details: &str) {
        if ok {
            println!("ok {name}: {details}");
        } else {
            self.failed += 1;
            println!("FAIL {name}: {details}");
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn main() -> i32 {
    let mut c = Checks { failed: 0 };
    rand_checks(&mut c);
    getrandom02_check(&mut c);
    uuid_checks(&mut c);
    hashbrown_checks(&mut c);
    serde_checks(&mut c);
    chrono_checks(&mut c);
    float_checks(&mut c);
    critical_section_checks(&mut c);
    log_checks();
    println!("failures: {}", c.failed);
    c.failed
}

fn rand_checks(c: &mut Checks) {
    use rand::rngs::{OsRng, StdRng};
    use rand::{Rng, SeedableRng, TryRngCore};

    let mut rng = StdRng::from_os_rng();
    let (a, b) = (rng.random::<u64>(), rng.random::<u64>());
    c.check("rand-stdrng", a != b, &format!("{a:016x}"));

    let mut seen = [0u32; 6];
    for _ in 0..6000 {
        seen[rng.random_range(1..=6usize) - 1] += 1;
    }
    // Each face expects 1000; below 800 or above 1200 is a broken generator (p < 1e-10).
    let fair = seen.iter().all(|&n| (800..=1200).contains(&n));
    c.check("rand-dice", fair, &format!("{seen:?}"));

    match OsRng.try_next_u64() {
        Ok(v) => c.check("rand-osrng", true, &format!("{v:016x}")),
        Err(e) => c.check("rand-osrng", false, &format!("{e}")),
    }
}

fn getrandom02_check(c: &mut Checks) {
    let mut buf = [0u8; 32];
    match getrandom02::getrandom(&mut buf) {
        Ok(()) => c.check("getrandom02", buf != [0u8; 32], &hex(&buf)),
        Err(e) => c.check("getrandom02", false, &format!("{e}")),
    }
}

fn uuid_checks(c: &mut Checks) {
    let (u1, u2) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let ok = u1.get_version() == Some(uuid::Version::Random)
        && u1.get_variant() == uuid::Variant::RFC4122
        && u1 != u2;
    c.check("uuid", ok, &format!("{u1}"));
    let parsed = uuid::Uuid::parse_str(&u1.to_string());
    c.check("uuid-parse", parsed == Ok(u1), &format!("{u2}"));
}

fn hashbrown_checks(c: &mut Checks) {
    let mut map: hashbrown::HashMap<String, u32> = hashbrown::HashMap::new();
    for i in 0..1000u32 {
        map.insert(format!("key-{i}"), i * 3);
    }
    let all = (0..1000u32).all(|i| map.get(&format!("key-{i}")) == Some(&(i * 3)));
    let absent = !map.contains_key("key-1000");
    map.retain(|_, v| *v % 2 == 0);
    c.check(
        "hashbrown",
        all && absent && map.len() == 500,
        &format!("{} entries after retain", map.len()),
    );
    let set: hashbrown::HashSet<u64> = (0..100).map(|i| i * i).collect();
    c.check(
        "hashbrown-set",
        set.len() == 100 && set.contains(&81),
        "100 squares",
    );
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Order {
    id: u64,
    customer: String,
    items: Vec<Item>,
    note: Option<String>,
}

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Item {
    sku: String,
    quantity: u32,
    price: f64,
}

fn serde_checks(c: &mut Checks) {
    let order = Order {
        id: 42,
        customer: "Ada \"the first\" Lovelace".into(),
        items: vec![
            Item {
                sku: "tea".into(),
                quantity: 2,
                price: 3.25,
            },
            Item {
                sku: "scone\u{e9}".into(),
                quantity: 1,
                price: 0.1,
            },
        ],
        note: None,
    };
    let json = serde_json::to_string(&order).unwrap_or_default();
    let back: Result<Order, _> = serde_json::from_str(&json);
    c.check("serde-roundtrip", back.ok().as_ref() == Some(&order), &json);

    let value: Result<serde_json::Value, _> =
        serde_json::from_str(r#"{"a":[1,2,{"b":null}],"c":"\u00e9","d":1.5e3}"#);
    let ok = match &value {
        Ok(v) => v["a"][2]["b"].is_null() && v["c"] == "é" && v["d"].as_f64() == Some(1500.0),
        Err(_) => false,
    };
    c.check(
        "serde-value",
        ok,
        &value.map(|v| v.to_string()).unwrap_or_default(),
    );
    let bad: Result<Order, _> = serde_json::from_str(r#"{"id":"x"}"#);
    c.check(
        "serde-error",
        bad.is_err(),
        &bad.err().map(|e| e.to_string()).unwrap_or_default(),
    );
}

fn chrono_checks(c: &mut Checks) {
    use chrono::{DateTime, Datelike, Days, NaiveDate};

    let now = pvrun::time::wall_clock();
    let date = DateTime::from_timestamp(now.as_secs() as i64, now.subsec_nanos());
    let text = date
        .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default();
    c.check(
        "chrono-now",
        date.is_some_and(|d| d.year() >= 2025),
        &format!("{text} unix={}", now.as_secs()),
    );
    let epoch = DateTime::from_timestamp(0, 0).map(|d| d.to_rfc3339());
    let leap = NaiveDate::from_ymd_opt(2024, 2, 28).and_then(|d| d.checked_add_days(Days::new(1)));
    c.check(
        "chrono-calendar",
        epoch.as_deref() == Some("1970-01-01T00:00:00+00:00")
            && leap == NaiveDate::from_ymd_opt(2024, 2, 29),
        &format!("{epoch:?} {leap:?}"),
    );
}

fn float_checks(c: &mut Checks) {
    use num_traits::Float;

    let root = libm::sqrt(2.0);
    let sine = libm::sin(core::f64::consts::FRAC_PI_2);
    let rem = libm::fmod(10.5, 3.0);
    let pow = Float::powf(2.0f64, 10.0);
    // `%` on floats compiles to a call of C's `fmod`/`fmodf`, which the SDK provides.
    let (a, b) = core::hint::black_box((10.5f64, 3.0f64));
    let (af, bf) = core::hint::black_box((7.5f32, 2.0f32));
    let rem_op = (a % b, af % bf);
    let ok = (root * root - 2.0).abs() < 1e-12
        && (sine - 1.0).abs() < 1e-15
        && rem == 1.5
        && rem_op == (1.5, 1.5)
        && pow == 1024.0
        && Float::ln(core::f64::consts::E) == 1.0;
    c.check(
        "libm",
        ok,
        &format!(
            "sqrt(2)={root:.6} sin(pi/2)={sine} fmod(10.5,3)={rem} 2^10={pow} 10.5%3={} 7.5f32%2={}",
            rem_op.0, rem_op.1
        ),
    );
}

static COUNTER: critical_section::Mutex<RefCell<u32>> =
    critical_section::Mutex::new(RefCell::new(0));

fn critical_section_checks(c: &mut Checks) {
    for _ in 0..10 {
        critical_section::with(|cs| {
            *COUNTER.borrow_ref_mut(cs) += 1;
            // Nested sections are fine.
            critical_section::with(|cs2| *COUNTER.borrow_ref_mut(cs2) += 1);
        });
    }
    let n = critical_section::with(|cs| *COUNTER.borrow_ref(cs));
    c.check("critical-section", n == 20, &format!("counter={n}"));
}

mod noisy {
    /// Logs under the target `ecosystem::noisy`, for the per-target filter.
    pub fn chatter() {
        log::info!("noisy info");
        log::debug!("noisy debug");
    }
}

fn log_checks() {
    pvrun::log::init();
    println!(
        "log: max level {} (RUST_LOG={:?})",
        log::max_level(),
        pvrun::env::var("RUST_LOG")
    );
    log::error!("log error line");
    log::warn!("log warn line");
    log::info!("log info line");
    log::debug!("log debug line");
    log::trace!("log trace line");
    noisy::chatter();
    log::logger().flush();
}
