//! Procedural macros of the pvrun guest SDK, re-exported by it: `#[pvrun::test]`.
//!
//! `#[pvrun::test]` marks a function as a test the way `#[test]` does for libtest, on
//! stable Rust (no `custom_test_frameworks`): it keeps the function (only under
//! `cfg(test)`, like `#[test]`) and registers it in the `.pvrun_tests` link section, which
//! the guest linker script gathers between `__pvrun_tests_start` and `__pvrun_tests_end`
//! and the SDK's test harness (`pvrun::testing`) reads. `#[should_panic]`,
//! `#[should_panic(expected = "...")]`, `#[ignore]` and `#[ignore = "reason"]` on the same
//! function are honoured.

use proc_macro::TokenStream;
use proc_macro2::TokenStream as TokenStream2;
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Attribute, Expr, ExprLit, ItemFn, Lit, Meta, ReturnType, parse_macro_input};

/// Marks a function as a pvrun test, run inside a pvrun VM by `cargo pvrun test`.
///
/// The function takes no arguments and returns `()` or another
/// `pvrun::process::Termination` type (for example `Result<(), E: Debug>`; an `Err` fails
/// the test). Put `#[should_panic]` / `#[ignore]` after this attribute.
#[proc_macro_attribute]
pub fn test(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        let attr = TokenStream2::from(attr);
        return quote_spanned! {attr.span()=>
            compile_error!("#[pvrun::test] takes no arguments (use #[ignore] or #[should_panic] on the function)");
        }
        .into();
    }
    let mut func = parse_macro_input!(item as ItemFn);
    match expand(&mut func) {
        Ok(ts) => ts.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// What the registration says about panics.
enum Panics {
    No,
    Yes,
    Expected(String),
}

fn expand(func: &mut ItemFn) -> syn::Result<TokenStream2> {
    let sig = &func.sig;
    if !sig.inputs.is_empty() {
        return Err(syn::Error::new(
            sig.inputs.span(),
            "a #[pvrun::test] function takes no arguments",
        ));
    }
    if sig.asyncness.is_some() || sig.constness.is_some() || sig.unsafety.is_some() {
        return Err(syn::Error::new(
            sig.span(),
            "a #[pvrun::test] function must be a plain `fn` (not async, const or unsafe)",
        ));
    }
    if !sig.generics.params.is_empty() || sig.generics.where_clause.is_some() {
        return Err(syn::Error::new(
            sig.generics.span(),
            "a #[pvrun::test] function cannot be generic",
        ));
    }
    let mut ignore = None;
    let mut panics = Panics::No;
    let mut kept: Vec<Attribute> = Vec::new();
    for a in func.attrs.drain(..) {
        if a.path().is_ident("ignore") {
            ignore = Some(match &a.meta {
                Meta::Path(_) => String::new(),
                Meta::NameValue(nv) => string_lit(&nv.value)?,
                Meta::List(l) => {
                    return Err(syn::Error::new(
                        l.span(),
                        "write #[ignore] or #[ignore = \"reason\"]",
                    ));
                }
            });
        } else if a.path().is_ident("should_panic") {
            panics = match &a.meta {
                Meta::Path(_) => Panics::Yes,
                Meta::NameValue(nv) => Panics::Expected(string_lit(&nv.value)?),
                Meta::List(_) => {
                    let mut expected = None;
                    a.parse_nested_meta(|m| {
                        if m.path.is_ident("expected") {
                            let v: Expr = m.value()?.parse()?;
                            expected = Some(string_lit(&v)?);
                            Ok(())
                        } else {
                            Err(m.error("write #[should_panic(expected = \"...\")]"))
                        }
                    })?;
                    expected.map_or(Panics::Yes, Panics::Expected)
                }
            };
        } else if a.path().is_ident("test") {
            return Err(syn::Error::new(
                a.span(),
                "use #[pvrun::test] alone: #[test] needs libtest, which cannot run in a pvrun guest",
            ));
        } else {
            kept.push(a);
        }
    }
    func.attrs = kept;
    let name = &func.sig.ident;
    let run = match &func.sig.output {
        ReturnType::Default => quote! { #name(); 0 },
        ReturnType::Type(..) => quote! { ::pvrun::process::Termination::report(#name()) },
    };
    let should_panic = match &panics {
        Panics::No => quote! { ::pvrun::testing::ShouldPanic::No },
        Panics::Yes => quote! { ::pvrun::testing::ShouldPanic::Yes },
        Panics::Expected(s) => quote! { ::pvrun::testing::ShouldPanic::Expected(#s) },
    };
    let ignored = ignore.is_some();
    let reason = ignore.unwrap_or_default();
    Ok(quote! {
        #[cfg(test)]
        #func

        #[cfg(test)]
        const _: () = {
            #[used]
            #[unsafe(link_section = ".pvrun_tests")]
            static __PVRUN_TEST: ::pvrun::testing::TestCase = ::pvrun::testing::TestCase {
                name: ::core::concat!(::core::module_path!(), "::", ::core::stringify!(#name)),
                run: {
                    fn __pvrun_run_test() -> i32 {
                        #run
                    }
                    __pvrun_run_test
                },
                ignore: #ignored,
                ignore_reason: #reason,
                should_panic: #should_panic,
            };
        };
    })
}

fn string_lit(e: &Expr) -> syn::Result<String> {
    match e {
        Expr::Lit(ExprLit {
            lit: Lit::Str(s), ..
        }) => Ok(s.value()),
        other => Err(syn::Error::new(other.span(), "expected a string literal")),
    }
}
