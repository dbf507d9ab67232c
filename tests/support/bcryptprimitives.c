/* A stand-in for Windows' bcryptprimitives.dll, which Wine 8.0 (Debian 12) lacks.
 *
 * Rust programs built for Windows since Rust 1.78 (cryptography's _rust.pyd among
 * them, from cryptography 43 on) take their random bytes from ProcessPrng in
 * bcryptprimitives.dll; without the DLL the extension does not load. Wine 9 ships
 * one. This stand-in draws them from RtlGenRandom (advapi32's SystemFunction036),
 * Wine's system generator. Built by tests/support/wine.py with mingw-w64 for the
 * Windows test harness only; never part of what the project ships.
 */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length)
{
    while (length > 0) {
        ULONG chunk = length > 0x10000000 ? 0x10000000 : (ULONG)length;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        length -= chunk;
    }
    return TRUE;
}
