//! CPU exceptions the host reports when a guest crashes.

/// Exception vectors the host reports (see `docs/ABI.md`); the names printed for them.
pub fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "divide error (#DE)",
        1 => "debug exception (#DB)",
        2 => "non-maskable interrupt (NMI)",
        3 => "breakpoint (#BP)",
        4 => "overflow (#OF)",
        5 => "bound range exceeded (#BR)",
        6 => "invalid opcode (#UD)",
        7 => "device not available (#NM)",
        8 => "double fault (#DF)",
        10 => "invalid TSS (#TS)",
        11 => "segment not present (#NP)",
        12 => "stack-segment fault (#SS)",
        13 => "general protection fault (#GP)",
        14 => "page fault (#PF)",
        16 => "x87 floating-point error (#MF)",
        17 => "alignment check (#AC)",
        18 => "machine check (#MC)",
        19 => "SIMD floating-point exception (#XM)",
        20 => "virtualization exception (#VE)",
        21 => "control protection exception (#CP)",
        _ => "reserved exception",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KNOWN: [(u64, &str); 20] = [
        (0, "divide error (#DE)"),
        (1, "debug exception (#DB)"),
        (2, "non-maskable interrupt (NMI)"),
        (3, "breakpoint (#BP)"),
        (4, "overflow (#OF)"),
        (5, "bound range exceeded (#BR)"),
        (6, "invalid opcode (#UD)"),
        (7, "device not available (#NM)"),
        (8, "double fault (#DF)"),
        (10, "invalid TSS (#TS)"),
        (11, "segment not present (#NP)"),
        (12, "stack-segment fault (#SS)"),
        (13, "general protection fault (#GP)"),
        (14, "page fault (#PF)"),
        (16, "x87 floating-point error (#MF)"),
        (17, "alignment check (#AC)"),
        (18, "machine check (#MC)"),
        (19, "SIMD floating-point exception (#XM)"),
        (20, "virtualization exception (#VE)"),
        (21, "control protection exception (#CP)"),
    ];

    #[test]
    fn known_vectors_have_their_names() {
        for (vector, name) in KNOWN {
            assert_eq!(exception_name(vector), name, "vector {vector}");
        }
    }

    #[test]
    fn other_vectors_are_reserved() {
        // 9 (coprocessor segment overrun) and 15 are reserved on x86-64, as is everything
        // from 22 up; vectors beyond 255 cannot occur but must not panic.
        for vector in (0..=300).chain([u64::MAX]) {
            if KNOWN.iter().all(|&(v, _)| v != vector) {
                assert_eq!(
                    exception_name(vector),
                    "reserved exception",
                    "vector {vector}"
                );
            }
        }
    }
}
